//! Kernel L4 steering on a simulated node: members reach the fork, everyone else the baseline,
//! and the application always sees the address it dialed.
mod support;

use redirector_tests::CallOpts;
use redirector_user::api::answers::MemberState;
use std::time::Duration;

use support::{BASELINE, Cluster, FORK, OTHER4, VIP4, VIP6, addr, eventually};

#[test]
fn member_reaches_the_fork_over_tcp_and_udp_v4_and_v6() {
    let Some(mut c) = Cluster::new("l4-member") else {
        return;
    };
    c.start(&[]);
    assert_eq!(c.tcp(&c.member, VIP4), FORK, "tcp v4");
    assert_eq!(c.tcp(&c.member, VIP6), FORK, "tcp v6");
    assert_eq!(c.udp(&c.member, VIP4), FORK, "udp v4");
    assert_eq!(c.udp(&c.member, VIP6), FORK, "udp v6");
}

/// Entries in a pinned map, read with bpftool.
fn map_entries(c: &Cluster, name: &str) -> usize {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(c.pin_dir().join(name))
        .output()
        .expect("bpftool (cargo xtask setup installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout)
        .expect("bpftool json")
        .len()
}

/// The reverse translation of a connected socket lives on the socket (and dies with it): TCP
/// and connected UDP leave nothing in the shared reverse map, which only unconnected sends
/// (one socket, several destinations) still use.
#[test]
fn connected_sockets_keep_their_reverse_translation_on_the_socket() {
    let Some(mut c) = Cluster::new("l4-sockstate") else {
        return;
    };
    c.start(&[]);
    for _ in 0..5 {
        assert_eq!(c.tcp(&c.member, VIP4), FORK);
        assert_eq!(c.tcp(&c.member, VIP6), FORK);
    }
    let connected = c
        .member
        .call(
            &c.node,
            redirector_tests::Proto::Udp,
            addr(VIP4),
            &CallOpts::new().connected(),
        )
        .expect("connected udp");
    assert_eq!(
        (connected.server.as_str(), connected.peer_unmapped()),
        (FORK, addr(VIP4))
    );
    assert!(
        c.pin_dir().join("RDR_SKSTATE_v2").exists(),
        "socket storage is pinned"
    );
    assert_eq!(map_entries(&c, "RDR_REVNAT_v2"), 0, "nothing left behind");
    assert_eq!(c.udp(&c.member, VIP4), FORK, "unconnected");
    assert_eq!(map_entries(&c, "RDR_REVNAT_v2"), 1);
}

/// The per-route steering counters take memory only for routes that steered, and go with
/// their route: a per-CPU map of the whole route capacity, preallocated, would hold about
/// 1 MiB per CPU of the node from the start.
#[test]
fn route_counters_are_allocated_on_use_and_removed_with_their_route() {
    let Some(mut c) = Cluster::new("l4-rtstat") else {
        return;
    };
    c.start(&[]);
    let pin = c.pin_dir().join("RDR_RTSTAT_v2");
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "show", "pinned"])
        .arg(&pin)
        .output()
        .expect("bpftool");
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool json");
    assert_eq!(info["type"], "percpu_hash", "{info}");
    assert_eq!(
        info["flags"].as_u64().unwrap_or(0) & 1,
        1,
        "BPF_F_NO_PREALLOC: {info}"
    );
    // The bucket array (16 bytes per possible entry, 2 MiB) and nothing per CPU: the
    // preallocated per-CPU LRU it replaces took 12 MiB on this 2-CPU machine (bpftool), and
    // about 100 MiB on a 96-CPU node.
    let memlock = info["bytes_memlock"].as_u64().expect("bytes_memlock");
    assert!(
        memlock < 3 << 20,
        "{memlock} bytes for an empty map: {info}"
    );

    assert_eq!(c.tcp(&c.member, VIP4), FORK);
    assert_eq!(map_entries(&c, "RDR_RTSTAT_v2"), 1, "one route steered");
    c.write_config(&c.config_text(false));
    assert!(
        eventually(Duration::from_secs(5), || map_entries(&c, "RDR_RTSTAT_v2")
            == 0),
        "the counter goes with its route"
    );
}

#[test]
fn v4_service_through_an_ipv6_socket_is_steered_and_hidden() {
    let Some(mut c) = Cluster::new("l4-mapped") else {
        return;
    };
    c.start(&[]);
    {
        let opts = CallOpts::new().v6_mapped();
        let tcp = c
            .member
            .call(&c.node, redirector_tests::Proto::Tcp, addr(VIP4), &opts)
            .expect("tcp");
        assert_eq!(tcp.server, FORK);
        assert_eq!(tcp.peer_unmapped(), addr(VIP4), "v4-mapped getpeername");
        let udp = c
            .member
            .call(&c.node, redirector_tests::Proto::Udp, addr(VIP4), &opts)
            .expect("udp");
        assert_eq!(udp.server, FORK);
        assert_eq!(udp.peer_unmapped(), addr(VIP4), "v4-mapped recvfrom source");
    }
    // A connected UDP socket is steered at connect() and its peer reads as the service.
    let connected = c
        .member
        .call(
            &c.node,
            redirector_tests::Proto::Udp,
            addr(VIP4),
            &CallOpts::new().connected(),
        )
        .expect("connected udp");
    assert_eq!(connected.server, FORK);
    assert_eq!(connected.peer_unmapped(), addr(VIP4));
}

/// Bits set in the pinned destination filter.
fn filter_bits(c: &Cluster) -> u32 {
    use aya::maps::{Array, Map, MapData};
    let pin = c.pin_dir().join(redirector_common::map_names::DST_FILTER);
    let data = MapData::from_pin(&pin).expect("filter pinned");
    let filter: Array<MapData, u64> = Array::try_from(Map::Array(data)).expect("an array");
    filter
        .iter()
        .map(|word| word.expect("read a word").count_ones())
        .sum()
}

/// The filter that lets untouched traffic skip the services lookup holds one bit per forked
/// service, set before steering starts, and no bit once nothing is forked.
#[test]
fn the_destination_filter_holds_exactly_the_forked_services() {
    let Some(mut c) = Cluster::new("l4-filter") else {
        return;
    };
    c.start(&[]);
    // svc-a over TCP and UDP, v4 and v6 (svc-b has no fork).
    assert_eq!(filter_bits(&c), 4);
    assert_eq!(c.tcp(&c.member, VIP4), FORK);
    c.write_config(&c.config_text(false));
    assert!(
        eventually(Duration::from_secs(5), || filter_bits(&c) == 0),
        "no service is forked any more: {} bits left",
        filter_bits(&c)
    );
    assert_eq!(c.tcp(&c.member, VIP4), BASELINE);
    c.write_config(&c.config_text(true));
    assert!(eventually(Duration::from_secs(5), || c
        .tcp(&c.member, VIP4)
        == FORK));
    assert_eq!(filter_bits(&c), 4);
}

#[test]
fn non_member_reaches_the_baseline() {
    let Some(mut c) = Cluster::new("l4-outsider") else {
        return;
    };
    c.start(&[]);
    assert_eq!(c.tcp(&c.outsider, VIP4), BASELINE);
    assert_eq!(c.tcp(&c.outsider, VIP6), BASELINE);
    assert_eq!(c.udp(&c.outsider, VIP4), BASELINE);
    assert_eq!(c.udp(&c.outsider, VIP6), BASELINE);
}

#[test]
fn member_calling_a_service_without_a_route_reaches_the_baseline() {
    let Some(mut c) = Cluster::new("l4-noroute") else {
        return;
    };
    c.start(&[]);
    assert_eq!(c.tcp(&c.member, OTHER4), BASELINE);
    // Same port, other protocol than any route: untouched too.
    let udp = c
        .member
        .call_udp(&c.node, addr(OTHER4), true)
        .expect("udp to unforked service");
    assert_eq!(udp.server, BASELINE);
}

#[test]
fn process_outside_the_attach_cgroup_is_never_steered() {
    let Some(mut c) = Cluster::new("l4-nocgroup") else {
        return;
    };
    c.start(&[]);
    // Same pod network namespace as the member, but not in the cgroup the programs attach to.
    let tcp = c.member.call_tcp(&c.node, addr(VIP4), false).expect("tcp");
    assert_eq!(tcp.server, BASELINE);
    let udp = c.member.call_udp(&c.node, addr(VIP6), false).expect("udp");
    assert_eq!(udp.server, BASELINE);
    // And the member in the cgroup still is.
    assert_eq!(c.tcp(&c.member, VIP4), FORK);
}

/// A pod sandbox restart deletes the pod's network namespace and creates a new one at the same
/// path; the kernel may even give it the dead one's inode number. The member must be steered
/// again within a second, whether the new namespace appears at once or after a pause, and
/// `status` must say what the kernel holds meanwhile.
#[test]
fn member_whose_namespace_is_replaced_is_steered_again() {
    let Some(mut c) = Cluster::new("l4-renewed") else {
        return;
    };
    c.start(&["--poll-interval", "200ms"]);
    assert_eq!(c.tcp(&c.member, VIP4), FORK, "before the restart");
    let member = c.member.clone();
    let member_states = |c: &Cluster| -> Vec<MemberState> {
        support::status(c).members.iter().map(|m| m.state).collect()
    };

    // Replaced at once: no poll can see the path missing.
    c.node.delete_pod_netns(&member).expect("delete netns");
    c.node.restore_pod_netns(&member).expect("restore netns");
    assert!(
        eventually(Duration::from_secs(1), || c.tcp(&c.member, VIP4) == FORK),
        "a namespace replaced at once is steered again within a second"
    );
    assert_eq!(member_states(&c), [MemberState::Steered]);

    // Replaced after a pause: the dead namespace's cookie leaves the kernel meanwhile.
    c.node.delete_pod_netns(&member).expect("delete netns");
    assert!(
        eventually(Duration::from_secs(1), || {
            let status = support::status(&c);
            status.map("members").is_some_and(|m| m.entries == 0)
                && member_states(&c) == [MemberState::Unresolved]
        }),
        "a gone namespace leaves the members map and shows as unresolved"
    );
    c.node.restore_pod_netns(&member).expect("restore netns");
    assert!(
        eventually(Duration::from_secs(1), || c.tcp(&c.member, VIP4) == FORK),
        "a namespace re-created after a pause is steered again within a second"
    );
    assert_eq!(member_states(&c), [MemberState::Steered]);
    // The outsider was never disturbed.
    assert_eq!(c.tcp(&c.outsider, VIP4), BASELINE);
}
