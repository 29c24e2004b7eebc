//! The kernel's two LRU tables, hand-off records (`RDR_ORIGDST`) and reverse entries of
//! unconnected UDP sends (`RDR_REVNAT`): full of entries nobody will use again (as leaked ones
//! would be), they evict those and live connections keep working, and the daemon counts the
//! evictions, which the kernel does not.
mod support;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use aya::{
    Pod,
    maps::{HashMap, Map, MapData},
};
use redirector_common::{FAMILY_V4, RevNatKey, SockAddr, map_names, map_sizes};
use redirector_tests::HttpReq;
use redirector_user::api::answers::{StatsAnswer, StatusAnswer};
use support::{
    Cluster, FORK, VIP6, eventually,
    l7::{L7, Routes, SVC_A, baggage, served_by},
    redirector,
};

/// Long enough for a few counts of the daemon's table accounting (every 2 s).
const COUNTED: Duration = Duration::from_secs(15);

/// An address in TEST-NET-1 (RFC 5737), which nothing on the node uses.
fn unused_addr(n: u32) -> SockAddr {
    SockAddr {
        addr: [u32::from_be_bytes([192, 0, 2, (n >> 16) as u8]), 0, 0, 0],
        port: (n as u16).to_be(),
        family: FAMILY_V4,
        _pad: 0,
    }
}

/// The CPU the tables are filled on; the traffic runs on [`TRAFFIC_CPU`].
const FILL_CPU: usize = 0;
const TRAFFIC_CPU: usize = 1;

/// Runs the calling thread (and the processes it starts from now on, which inherit it) on
/// `cpu` only.
///
/// An LRU map hands out free entries from per-CPU lists: filling it on one CPU leaves up to a
/// batch (128) of free entries in that CPU's list, so traffic on the same CPU could use them and
/// evict nothing. Traffic on another CPU, whose list is empty, makes the table evict at its
/// first write.
fn pin_to(cpu: usize) {
    use nix::sched::{CpuSet, sched_setaffinity};
    // Online CPUs, not `available_parallelism` (which a previous pin narrows to one).
    let online = aya::util::online_cpus().expect("online CPUs");
    assert!(
        online.contains(&(TRAFFIC_CPU as u32)),
        "these tests need CPUs {FILL_CPU} and {TRAFFIC_CPU} (fill on one, traffic on the other); \
         online: {online:?}"
    );
    let mut set = CpuSet::new();
    set.set(cpu).expect("a CPU index");
    sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).expect("sched_setaffinity");
}

/// Fills the pinned LRU map at `pin` with `count` entries, as if from connections long gone.
fn fill<K: Pod, V: Pod>(pin: &Path, count: u32, entry: impl Fn(u32) -> (K, V)) {
    pin_to(FILL_CPU);
    let data = MapData::from_pin(pin).unwrap_or_else(|e| panic!("{}: {e}", pin.display()));
    let mut map: HashMap<MapData, K, V> =
        HashMap::try_from(Map::LruHashMap(data)).expect("an LRU hash map");
    for n in 0..count {
        let (key, value) = entry(n);
        map.insert(key, value, 0).expect("insert");
    }
    pin_to(TRAFFIC_CPU);
}

/// `redirector stats|status -o json` against the daemon at `socket`.
fn answer<T: serde::de::DeserializeOwned>(socket: &Path, what: &str) -> T {
    let out = Command::new(redirector())
        .args([what, "-o", "json", "--socket"])
        .arg(socket)
        .output()
        .expect("run redirector CLI");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json answer")
}

fn kernel_counter(socket: &Path, name: &str) -> Option<u64> {
    answer::<StatsAnswer>(socket, "stats").kernel.get(name)
}

fn table_entries(socket: &Path, table: &str) -> Option<usize> {
    answer::<StatusAnswer>(socket, "status")
        .maps
        .iter()
        .find(|m| m.map == table)
        .map(|m| m.entries)
}

/// Waits for the daemon's first count of a table filled by [`fill`]; returns its entries. An
/// LRU map starts evicting a little before its capacity (its free entries sit in per-CPU
/// lists), so "full" is within a few batches of it.
fn wait_full(socket: &Path, table: &str, capacity: u32) -> u64 {
    let near_full = |n: usize| n + 1_024 > capacity as usize;
    assert!(
        eventually(COUNTED, || table_entries(socket, table)
            .is_some_and(near_full)),
        "status shows the {table} table full: {:?}",
        table_entries(socket, table)
    );
    table_entries(socket, table).unwrap_or(0) as u64
}

#[test]
fn a_full_handoff_table_evicts_leaked_records_serves_every_connection_and_counts() {
    let Some(mut c) = L7::new("lru-handoff") else {
        return;
    };
    // Nothing is handed off before the fill: a hand-off would leave free entries in its CPU's
    // list (see `pin_to`).
    c.start(Routes::both());
    let socket: PathBuf = c.node.dir().join("api.sock");
    let spec = HttpReq::get("/who")
        .header("baggage", &baggage("pr-1"))
        .spec();
    let keyed = ["h1", "--addr", SVC_A, "--req", &spec];

    // While the daemon is down nothing is handed off, so nothing else writes the table.
    c.daemon().terminate().expect("terminate");
    c.daemon = None;
    let pin = c.node.bpffs().join("redirector").join(map_names::ORIG_DST);
    fill(&pin, map_sizes::ORIG_DST, |n| {
        (unused_addr(n), unused_addr(n))
    });
    c.start(Routes::both());
    let full = wait_full(&socket, "handoff_records", map_sizes::ORIG_DST);
    assert_eq!(kernel_counter(&socket, "handoff_records_evicted"), Some(0));

    // Each connection's record goes into the full table: the table evicts leaked records to
    // make room, and no live one.
    for _ in 0..20 {
        assert_eq!(served_by(&c.http(&c.frontend, &keyed)), ["fork-pr1"]);
    }
    assert!(
        eventually(COUNTED, || kernel_counter(
            &socket,
            "handoff_records_evicted"
        )
        .is_some_and(|n| n > 0)),
        "evictions counted: {:?}",
        answer::<StatsAnswer>(&socket, "stats").kernel
    );
    let stats = answer::<StatsAnswer>(&socket, "stats");
    let router = stats.router.expect("router counters");
    assert_eq!(router["connections_refused"], 0, "no live record was lost");
    assert_eq!(router["handoff_records_taken"], 20);
    assert_eq!(stats.kernel.get("handoff_record_failed"), Some(0));
    let evicted = stats.kernel.get("handoff_records_evicted").unwrap_or(0);
    let left = table_entries(&socket, "handoff_records").unwrap_or(0) as u64;
    // Every leaked record either is still there or was evicted; the live ones were taken.
    assert_eq!(left + evicted, full, "left {left}");

    let scrape = support::scrape(&c.node);
    assert_eq!(
        support::sample(
            &scrape,
            "redirector_kernel_events_total{event=\"handoff_records_evicted\"}"
        ),
        evicted as f64,
        "{scrape}"
    );
    assert_eq!(
        support::sample(&scrape, "redirector_map_entries{map=\"handoff_records\"}"),
        left as f64
    );
}

#[test]
fn a_full_reverse_table_evicts_old_entries_keeps_replies_translated_and_counts() {
    let Some(mut c) = Cluster::new("lru-revnat") else {
        return;
    };
    // No steered send before the fill (see `pin_to`).
    c.start(&[]);

    c.daemon().terminate().expect("terminate");
    c.daemon = None;
    let pin = c.pin_dir().join(map_names::REVNAT);
    fill(&pin, map_sizes::REVNAT, |n| {
        let key = RevNatKey {
            // Cookies count up from 1; these belong to no socket.
            socket_cookie: u64::MAX - u64::from(n),
            fork: unused_addr(n),
            _pad: 0,
        };
        (key, unused_addr(n))
    });
    c.start(&[]);
    let socket = c.api_socket();
    wait_full(&socket, "reverse_entries", map_sizes::REVNAT);
    assert_eq!(kernel_counter(&socket, "reverse_entries_evicted"), Some(0));

    // Each call is a new socket, so a new entry in the full table; `udp` checks that the reply
    // comes from the address dialed, which needs the entry.
    for _ in 0..20 {
        assert_eq!(c.udp(&c.member, VIP6), FORK);
    }
    assert!(
        eventually(COUNTED, || kernel_counter(
            &socket,
            "reverse_entries_evicted"
        )
        .is_some_and(|n| n >= 20)),
        "evictions counted: {:?}",
        answer::<StatsAnswer>(&socket, "stats").kernel
    );
    let stats = answer::<StatsAnswer>(&socket, "stats");
    assert_eq!(stats.kernel.get("revnat_update_failed"), Some(0));
}
