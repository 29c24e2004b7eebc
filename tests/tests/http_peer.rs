//! Self-tests of rdr-http and its harness API: no daemon involved, only namespaces, the
//! kube-proxy stand-in and real HTTP/1.1, h2c and gRPC traffic through the service VIPs.

use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::process::Command;

use redirector_tests::{HttpReq, Node, Pod, Server, require_e2e};
use serde_json::Value;

const VIP4: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
const PORT: u16 = 8080;
const A4: &str = "10.96.0.10:8080";
const A6: &str = "[fd00:96::10]:8080";
const MIB8: &str = "8388608";
const BAGGAGE: &str = "sd-routing-key=pr-1";

struct Cluster {
    // Field order is drop order: the server goes before the node tears the namespaces down.
    _web: Server,
    client: Pod,
    node: Node,
    footprint: Footprint,
}

fn cluster(label: &str) -> Cluster {
    let mut node = Node::new(label).expect("node");
    let client = node.add_pod("client").expect("client pod");
    let web = node.add_pod("web").expect("web pod");
    let server = web.serve_http(&node, "web", PORT).expect("web server");
    node.add_vip(IpAddr::V4(VIP4), &web).expect("v4 VIP");
    node.add_vip(IpAddr::V6(VIP6), &web).expect("v6 VIP");
    Cluster {
        _web: server,
        client,
        footprint: Footprint::of(&node),
        node,
    }
}

impl Cluster {
    fn http(&self, args: &[&str]) -> Vec<Value> {
        self.client
            .http(&self.node, args)
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Tears the node down and checks that nothing of it is left.
    fn finish(self) {
        let footprint = Footprint {
            prefix: self.footprint.prefix.clone(),
            cgroup: self.footprint.cgroup.clone(),
        };
        drop(self);
        footprint.assert_gone();
    }
}

struct Footprint {
    prefix: String,
    cgroup: PathBuf,
}

impl Footprint {
    fn of(node: &Node) -> Footprint {
        Footprint {
            prefix: node.prefix().to_owned(),
            cgroup: node.cgroup().to_owned(),
        }
    }

    fn assert_gone(&self) {
        let out = Command::new(redirector_tests::ip_bin().expect("ip"))
            .args(["netns", "list"])
            .output()
            .expect("ip netns list");
        let list = String::from_utf8_lossy(&out.stdout);
        assert!(
            !list.contains(&format!("{}-", self.prefix)),
            "netns left behind:\n{list}"
        );
        assert!(
            !self.cgroup.exists(),
            "cgroup {} left behind",
            self.cgroup.display()
        );
        let mounts = fs::read_to_string("/proc/mounts").expect("/proc/mounts");
        assert!(
            !mounts.contains(&self.prefix),
            "mount left behind:\n{mounts}"
        );
    }
}

fn one(lines: Vec<Value>) -> Value {
    assert_eq!(lines.len(), 1, "expected one output line: {lines:?}");
    lines.into_iter().next().expect("one line")
}

#[test]
fn h1_keep_alive_carries_several_requests_and_echoes_headers() {
    if !require_e2e() {
        return;
    }
    let c = cluster("http-h1");
    let specs = [
        HttpReq::get("/first?x=1")
            .header("baggage", BAGGAGE)
            .header("x-multi", "a")
            .header("x-multi", "b")
            .spec(),
        HttpReq::post("/second", "twelve bytes").spec(),
        HttpReq::get("/third").spec(),
    ];
    for addr in [A4, A6] {
        let lines = c.http(&[
            "h1", "--addr", addr, "--req", &specs[0], &specs[1], &specs[2],
        ]);
        assert_eq!(lines.len(), 3, "{addr}: {lines:?}");
        let port = &lines[0]["local_port"];
        assert!(port.as_u64().is_some_and(|p| p > 0), "{addr}: {lines:?}");
        for l in &lines {
            assert_eq!(l["status"], 200, "{addr}: {l}");
            assert_eq!(l["served_by"], "web", "{addr}: {l}");
            assert_eq!(l["server"], "web", "{addr}: {l}");
            assert_eq!(
                &l["local_port"], port,
                "{addr}: one connection for all: {lines:?}"
            );
            assert_eq!(l["body"]["version"], "HTTP/1.1", "{addr}: {l}");
            assert_eq!(l["headers"]["x-served-by"], "web", "{addr}: {l}");
        }
        let first = &lines[0]["body"];
        assert_eq!(first["path"], "/first?x=1", "{first}");
        assert_eq!(first["method"], "GET", "{first}");
        assert_eq!(
            first["headers"]["baggage"],
            serde_json::json!([BAGGAGE]),
            "{first}"
        );
        assert_eq!(
            first["headers"]["x-multi"],
            serde_json::json!(["a", "b"]),
            "{first}"
        );
        assert_eq!(
            first["headers"]["host"],
            serde_json::json!([addr]),
            "{first}"
        );
        // The server saw the VIP as its local address: the client really went through it.
        assert_eq!(first["local"], addr, "{first}");
        let second = &lines[1]["body"];
        assert_eq!(second["method"], "POST", "{second}");
        assert_eq!(second["body_bytes"], 12, "{second}");
    }
    c.finish();
}

#[test]
fn h2_streams_run_concurrently_on_one_connection() {
    if !require_e2e() {
        return;
    }
    let c = cluster("http-h2");
    // The first stream is held for a while; the others must not wait behind it, and the
    // answers still come out in request order.
    let specs: Vec<String> = (0..4)
        .map(|i| {
            let path = if i == 0 {
                "/delay/1000".to_owned()
            } else {
                format!("/s{i}")
            };
            HttpReq::get(&path)
                .header("baggage", &format!("sd-routing-key=pr-{i}"))
                .spec()
        })
        .collect();
    for addr in [A4, A6] {
        let mut args = vec!["h2", "--addr", addr, "--req"];
        args.extend(specs.iter().map(String::as_str));
        let lines = c.http(&args);
        assert_eq!(lines.len(), 4, "{addr}: {lines:?}");
        for (i, l) in lines.iter().enumerate() {
            assert_eq!(l["status"], 200, "{addr}: {l}");
            assert_eq!(l["served_by"], "web", "{addr}: {l}");
            assert_eq!(l["version"], "HTTP/2.0", "{addr}: {l}");
            assert_eq!(l["body"]["version"], "HTTP/2.0", "{addr}: {l}");
            assert_eq!(l["local_port"], lines[0]["local_port"], "{addr}: {lines:?}");
            assert_eq!(
                l["body"]["headers"]["baggage"],
                serde_json::json!([format!("sd-routing-key=pr-{i}")]),
                "{addr}: {l}"
            );
            assert_eq!(l["body"]["authority"], addr, "{addr}: {l}");
        }
        let elapsed = |l: &Value| l["elapsed_ms"].as_u64().expect("elapsed_ms");
        assert!(elapsed(&lines[0]) >= 1000, "{addr}: {lines:?}");
        for l in &lines[1..] {
            // Serialized behind the held stream they would take over a second.
            assert!(
                elapsed(l) < 900,
                "{addr}: stream waited for another: {lines:?}"
            );
        }
    }
    c.finish();
}

#[test]
fn grpc_unary_and_bidi_streaming() {
    if !require_e2e() {
        return;
    }
    let c = cluster("http-grpc");
    let meta = format!("baggage={BAGGAGE}");
    for addr in [A4, A6] {
        let lines = c.http(&["grpc", "--addr", addr, "--metadata", &meta]);
        assert_eq!(lines.len(), 2, "{addr}: {lines:?}");
        assert_eq!(lines[0]["server"], "web", "{addr}: {lines:?}");
        assert_eq!(lines[0]["text"], "hello", "{addr}: {lines:?}");
        assert_eq!(lines[0]["routing"], BAGGAGE, "{addr}: {lines:?}");
        assert_eq!(lines[1]["grpc_status"], 0, "{addr}: {lines:?}");

        let lines = c.http(&["grpc", "--addr", addr, "--stream", "5", "--text", "m"]);
        assert_eq!(lines.len(), 6, "{addr}: {lines:?}");
        for (i, l) in lines[..5].iter().enumerate() {
            assert_eq!(l["server"], "web", "{addr}: {l}");
            assert_eq!(l["text"], format!("m-{i}"), "{addr}: {l}");
            assert_eq!(l["routing"], "", "{addr}: no metadata sent: {l}");
        }
        assert_eq!(lines[5]["grpc_status"], 0, "{addr}: {lines:?}");
    }
    c.finish();
}

#[test]
fn large_bodies_stream_intact_both_ways() {
    if !require_e2e() {
        return;
    }
    let c = cluster("http-bulk");
    let header = format!("baggage={BAGGAGE}");
    for addr in [A4, A6] {
        for extra in [&[][..], &["--http2"][..], &["--chunked"][..]] {
            let mut args = vec![
                "upload", "--addr", addr, "--bytes", MIB8, "--header", &header,
            ];
            args.extend_from_slice(extra);
            let l = one(c.http(&args));
            assert_eq!(l["status"], 200, "{addr} {extra:?}: {l}");
            assert_eq!(l["served_by"], "web", "{addr} {extra:?}: {l}");
            assert_eq!(l["sent"], 8388608, "{addr} {extra:?}: {l}");
            assert_eq!(l["received"], 8388608, "{addr} {extra:?}: {l}");
            assert_eq!(l["intact"], true, "{addr} {extra:?}: {l}");
        }
        for extra in [&[][..], &["--http2"][..]] {
            let mut args = vec!["download", "--addr", addr, "--bytes", MIB8];
            args.extend_from_slice(extra);
            let l = one(c.http(&args));
            assert_eq!(l["status"], 200, "{addr} {extra:?}: {l}");
            assert_eq!(l["served_by"], "web", "{addr} {extra:?}: {l}");
            assert_eq!(l["received"], 8388608, "{addr} {extra:?}: {l}");
            assert_eq!(l["intact"], true, "{addr} {extra:?}: {l}");
        }
    }
    c.finish();
}

#[test]
fn upgrade_hands_over_the_connection() {
    if !require_e2e() {
        return;
    }
    let c = cluster("http-upgrade");
    for addr in [A4, A6] {
        let l = one(c.http(&[
            "upgrade",
            "--addr",
            addr,
            "--header",
            "baggage=sd-routing-key=pr-1",
        ]));
        assert_eq!(l["status"], 101, "{addr}: {l}");
        assert_eq!(l["served_by"], "web", "{addr}: {l}");
        assert_eq!(l["greeting"], "web", "{addr}: {l}");
        assert_eq!(l["echo"], "ping", "{addr}: {l}");
    }
    c.finish();
}

#[test]
fn raw_bad_requests_get_errors_not_hangs() {
    if !require_e2e() {
        return;
    }
    let c = cluster("http-raw");
    for addr in [A4, A6] {
        let l = one(c.http(&["raw", "--addr", addr, "--send", "GARBAGE\\r\\n\\r\\n"]));
        assert_eq!(l["status"], 400, "{addr}: {l}");
        assert_eq!(l["closed"], true, "{addr}: {l}");
    }

    let l = one(c.http(&["raw", "--addr", A4, "--send-header-bytes", "1048576"]));
    assert!(
        l["status"] == 431 || l["closed"] == true,
        "oversized header neither refused nor closed: {l}"
    );

    // Dripped one byte at a time, a valid request is still answered.
    let l = one(c.http(&[
        "raw",
        "--addr",
        A6,
        "--send",
        "GET /drip HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n",
        "--drip-ms",
        "5",
    ]));
    assert_eq!(l["status"], 200, "{l}");
    assert_eq!(l["closed"], true, "{l}");
    assert_eq!(l["write_error"], Value::Null, "{l}");
    assert!(
        l["response"]
            .as_str()
            .is_some_and(|r| r.contains("x-served-by: web")),
        "{l}"
    );
    c.finish();
}

#[test]
fn expect_100_continue_uploads_work() {
    if !require_e2e() {
        return;
    }
    let c = cluster("http-expect");
    let spec = HttpReq::post("/expect", "payload!")
        .header("expect", "100-continue")
        .spec();
    for addr in [A4, A6] {
        let l = one(c.http(&["h1", "--addr", addr, "--req", &spec]));
        assert_eq!(l["status"], 200, "{addr}: {l}");
        assert_eq!(l["served_by"], "web", "{addr}: {l}");
        assert_eq!(l["body"]["body_bytes"], 8, "{addr}: {l}");
        assert_eq!(
            l["body"]["headers"]["expect"],
            serde_json::json!(["100-continue"]),
            "{addr}: {l}"
        );
    }
    // On the wire: headers alone get the interim 100 before any body byte is sent.
    let l = one(c.http(&[
        "raw",
        "--addr",
        A4,
        "--send",
        "POST /expect HTTP/1.1\\r\\nHost: x\\r\\nExpect: 100-continue\\r\\nContent-Length: 4\\r\\n\\r\\n",
        "--read-ms",
        "1000",
    ]));
    assert_eq!(l["status"], 100, "{l}");
    assert_eq!(l["closed"], false, "{l}");
    c.finish();
}

#[test]
fn clients_fail_fast_with_a_message() {
    if !require_e2e() {
        return;
    }
    let c = cluster("http-fail");
    // Nothing listens on 8081: refused at once, and the error names the command and cause.
    let err = c
        .client
        .http(
            &c.node,
            &["h1", "--addr", "10.96.0.10:8081", "--timeout-ms", "1000"],
        )
        .expect_err("closed port");
    let msg = format!("{err:#}");
    assert!(msg.contains("refused"), "{msg}");
    assert!(msg.contains("rdr-http h1 --addr 10.96.0.10:8081"), "{msg}");
    c.finish();
}
