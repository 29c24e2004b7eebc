//! Many routes: 10 000 of them load and steer correctly (the lookup is a hash, not a scan).
mod support;

use std::{fmt::Write as _, net::SocketAddr};

use support::{Cluster, FORK, VIP4, addr};

#[test]
fn ten_thousand_routes_load_and_steer() {
    let Some(mut c) = Cluster::new("scale-10k") else {
        return;
    };
    const N: usize = 10_000;
    let service = |i: usize| -> SocketAddr {
        format!("10.97.{}.{}:8080", i / 200, i % 200 + 1)
            .parse()
            .unwrap()
    };
    let mut text = c.config_text(true);
    // A second sandbox whose member is the `member` pod would conflict with pr-1; instead the
    // bulk routes join pr-1 itself: rewrite its routes list.
    let mut bulk = String::new();
    for i in 0..N {
        let _ = writeln!(
            bulk,
            "\n[[service]]\nname = \"bulk-{i}\"\naddress = \"{}\"",
            service(i)
        );
    }
    let mut routes = String::from("routes = [\n");
    routes.push_str(&format!(
        "  {{ service = \"svc-a\", fork = \"{}:8080\" }},\n",
        c.fork.ipv4
    ));
    for i in 0..N {
        let _ = writeln!(
            routes,
            "  {{ service = \"bulk-{i}\", fork = \"{}:8080\" }},",
            c.fork.ipv4
        );
    }
    routes.push(']');
    let sandbox_at = text.find("[[sandbox]]").unwrap();
    text.insert_str(sandbox_at, &bulk);
    let routes_at = text.find("routes = [").unwrap();
    text.truncate(routes_at);
    text.push_str(&routes);
    text.push('\n');
    c.write_config(&text);

    let daemon = c.start(&[]);
    assert!(
        daemon.logs().contains(&format!("routes={}", N + 1)),
        "{}",
        daemon.logs()
    );

    // Spread over the whole table: first, last, and a stride through the middle.
    for i in (0..N).step_by(997).chain([N - 1]) {
        let to = service(i).to_string();
        assert_eq!(c.tcp(&c.member, &to), FORK, "route {i} ({to})");
    }
    assert_eq!(c.tcp(&c.member, VIP4), FORK);
    // Non-members still reach the baseline of the original service.
    assert_eq!(c.tcp(&c.outsider, VIP4), support::BASELINE);
    let _ = addr(VIP4);
}
