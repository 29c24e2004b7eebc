//! Reading the kernel's counters: the per-event totals (`RDR_STATS`) and the per-route steering
//! counters (`RDR_RTSTAT`, a walk of up to one entry per route). Through handles of their own,
//! so that `stats` and metrics scrapes read them on the blocking pool, never on the control loop.
use std::io;

use aya::maps::{IterableMap as _, Map, MapData, MapError, PerCpuArray, PerCpuHashMap};
use redirector_common::{RouteKey, stats};

use super::{SyncError, second_handle};

/// Per-event counters summed over CPUs, in `redirector_common::stats` order.
pub type Counters = [(&'static str, u64); stats::COUNT as usize];

pub struct CounterReader {
    stats: PerCpuArray<MapData, u64>,
    route_stats: PerCpuHashMap<MapData, RouteKey, u64>,
}

impl CounterReader {
    /// Takes the event counters' handle; opens a second one on the route counters (the sync
    /// keeps the first, to remove the counters of routes that go).
    pub fn new(
        stats: PerCpuArray<MapData, u64>,
        route_stats: &PerCpuHashMap<MapData, RouteKey, u64>,
    ) -> io::Result<CounterReader> {
        let data = second_handle(route_stats.map())?;
        let route_stats =
            PerCpuHashMap::try_from(Map::PerCpuHashMap(data)).map_err(io::Error::other)?;
        Ok(CounterReader { stats, route_stats })
    }

    pub fn counters(&self) -> Result<Counters, SyncError> {
        let mut out = stats::NAMES.map(|name| (name, 0));
        for (slot, entry) in out.iter_mut().enumerate() {
            let values = self
                .stats
                .get(&(slot as u32), 0)
                .map_err(|source| SyncError::Map {
                    map: "stats",
                    op: "read",
                    source,
                })?;
            entry.1 = values.iter().sum();
        }
        Ok(out)
    }

    /// Connections steered per route since load, summed over CPUs.
    pub fn route_counters(&self) -> Result<Vec<(RouteKey, u64)>, SyncError> {
        self.route_stats
            .iter()
            .map(|entry| entry.map(|(key, values)| (key, values.iter().sum())))
            .collect::<Result<_, MapError>>()
            .map_err(|source| SyncError::Map {
                map: "route_stats",
                op: "read",
                source,
            })
    }
}
