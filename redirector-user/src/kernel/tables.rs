//! What becomes of the entries of the two kernel tables that are still LRU maps:
//! `RDR_ORIGDST` (hand-off records, by client address, taken by the router on accept) and
//! `RDR_REVNAT` (reverse entries of unconnected UDP sends, by socket and fork).
//!
//! Both need a map (they are found by a key the socket's own storage cannot answer), and both
//! are LRU so that entries nobody removes (a record whose connection never reached the router,
//! the reverse entries of a closed socket) cannot fill them for good. The kernel counts no LRU
//! evictions, so they are derived from three numbers per table: what the programs wrote
//! (`RDR_TBLSTAT`), what left it otherwise (the router's takes; nothing removes a reverse entry)
//! and what is left (a walk of its keys):
//!
//! ```text
//! evicted since the first count = written − taken − (left now − left then)
//! ```
//!
//! The reads are ordered so that a write or a take racing a count makes the figure low, never
//! high: it is a lower bound while the table changes, exact when it holds still. A hand-off
//! record that a new connection from the same client address and port overwrites counts as
//! evicted too: it is gone without the router taking it, either way. Counting runs
//! on its own thread, every [`INTERVAL`], and walks a table only when its counters moved.
use std::{
    collections::HashSet,
    hash::Hash,
    io,
    sync::{Arc, Mutex, mpsc},
    thread,
    time::Duration,
};

use aya::{
    Pod,
    maps::{HashMap as BpfHashMap, IterableMap as _, Map, MapData, MapError, PerCpuArray},
};
use redirector_common::{RevNatKey, SockAddr, map_sizes, table_stats};

use super::maps::second_handle;
use tracing::warn;

/// How often the tables are counted.
pub const INTERVAL: Duration = Duration::from_secs(2);

/// Handles on the two tables and their write counters.
pub struct Tables {
    handoff: BpfHashMap<MapData, SockAddr, SockAddr>,
    reverse: BpfHashMap<MapData, RevNatKey, SockAddr>,
    written: PerCpuArray<MapData, u64>,
}

/// The tables as last counted. Evictions count from the daemon's start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TableCounts {
    /// Hand-off records waiting for the router (or left by connections that never reached it).
    pub handoff_records: u64,
    /// Hand-off records evicted: a connection whose record went is closed by the router.
    pub handoff_records_evicted: u64,
    /// Hand-off records the kernel could not write, since the table was created.
    pub handoff_record_failed: u64,
    pub reverse_entries: u64,
    /// Reverse entries evicted. Entries of closed sockets only ever leave this way, so on a
    /// full table this rises steadily; a live socket's entry among them makes its replies show
    /// the fork's address.
    pub reverse_entries_evicted: u64,
}

impl TableCounts {
    /// (table, entries, capacity) of the two tables, as `status` and `/metrics` name them.
    pub fn occupancy(&self) -> [(&'static str, usize, u32); 2] {
        [
            (
                "handoff_records",
                self.handoff_records as usize,
                map_sizes::ORIG_DST,
            ),
            (
                "reverse_entries",
                self.reverse_entries as usize,
                map_sizes::REVNAT,
            ),
        ]
    }

    /// (name, value) of the counters, as `stats` and `/metrics` name them.
    pub fn counters(&self) -> [(&'static str, u64); 3] {
        [
            ("handoff_records_evicted", self.handoff_records_evicted),
            ("handoff_record_failed", self.handoff_record_failed),
            ("reverse_entries_evicted", self.reverse_entries_evicted),
        ]
    }
}

/// Another handle on `RDR_ORIGDST`, for another thread.
pub fn reopen_handoff(
    map: &BpfHashMap<MapData, SockAddr, SockAddr>,
) -> io::Result<BpfHashMap<MapData, SockAddr, SockAddr>> {
    let data = second_handle(map.map())?;
    // RDR_ORIGDST is an LRU hash map (see redirector-ebpf's maps).
    BpfHashMap::try_from(Map::LruHashMap(data)).map_err(io::Error::other)
}

impl Tables {
    /// Second handles on the maps the loader holds (the router takes the first hand-off one).
    pub fn new(
        handoff: &BpfHashMap<MapData, SockAddr, SockAddr>,
        reverse: BpfHashMap<MapData, RevNatKey, SockAddr>,
        written: PerCpuArray<MapData, u64>,
    ) -> io::Result<Tables> {
        Ok(Tables {
            handoff: reopen_handoff(handoff)?,
            reverse,
            written,
        })
    }

    fn written(&self, slot: u32) -> Result<u64, MapError> {
        Ok(self.written.get(&slot, 0)?.iter().sum())
    }
}

/// One table at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Ledger {
    written: u64,
    taken: u64,
    left: u64,
}

/// Entries evicted between `then` and `now`; never below zero (a count that raced a write).
fn evicted(then: Ledger, now: Ledger) -> u64 {
    let written = i128::from(now.written) - i128::from(then.written);
    let taken = i128::from(now.taken) - i128::from(then.taken);
    let grown = i128::from(now.left) - i128::from(then.left);
    u64::try_from(written - taken - grown).unwrap_or(0)
}

/// Counts of one table since the first, kept monotonic.
#[derive(Debug, Default)]
struct Derived {
    first: Option<Ledger>,
    last: Ledger,
    evicted: u64,
}

impl Derived {
    fn record(&mut self, now: Ledger) {
        match self.first {
            None => self.first = Some(now),
            Some(first) => self.evicted = self.evicted.max(evicted(first, now)),
        }
        self.last = now;
    }

    /// Whether anything was written or taken since the last count: if not, nothing can have
    /// been evicted and the walk is skipped.
    fn moved(&self, written: u64, taken: u64) -> bool {
        self.first.is_none() || written != self.last.written || taken != self.last.taken
    }
}

/// The counting thread and its last figures. The thread ends when this is dropped.
pub struct Accounting {
    counts: Arc<Mutex<Option<TableCounts>>>,
    _stop: mpsc::Sender<()>,
}

impl Accounting {
    /// Starts counting; `taken` reads how many hand-off records the router has taken.
    pub fn start(
        tables: Tables,
        taken: Box<dyn Fn() -> u64 + Send>,
        interval: Duration,
    ) -> io::Result<Accounting> {
        let counts = Arc::new(Mutex::new(None));
        let (stop, stopped) = mpsc::channel();
        let shared = counts.clone();
        thread::Builder::new()
            .name("rdr-tables".to_owned())
            .spawn(move || count_loop(&tables, &*taken, &shared, &stopped, interval))?;
        Ok(Accounting {
            counts,
            _stop: stop,
        })
    }

    /// The figures of the last count; None before the first.
    pub fn counts(&self) -> Option<TableCounts> {
        *self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn count_loop(
    tables: &Tables,
    taken: &dyn Fn() -> u64,
    shared: &Mutex<Option<TableCounts>>,
    stopped: &mpsc::Receiver<()>,
    interval: Duration,
) {
    let mut handoff = Derived::default();
    let mut reverse = Derived::default();
    let mut warned = false;
    loop {
        match count(tables, taken, &mut handoff, &mut reverse) {
            Ok(counts) => *shared.lock().unwrap_or_else(|e| e.into_inner()) = Some(counts),
            Err(err) if !warned => {
                warned = true;
                warn!(error = %crate::error_chain(&err), "cannot count the kernel's LRU tables");
            }
            Err(_) => {}
        }
        match stopped.recv_timeout(interval) {
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
    }
}

fn count(
    tables: &Tables,
    taken: &dyn Fn() -> u64,
    handoff: &mut Derived,
    reverse: &mut Derived,
) -> Result<TableCounts, MapError> {
    // The first count reads what leaves before the walk and what is written after it, later
    // ones the other way round: either way a race makes the derived evictions low.
    let first = handoff.first.is_none();
    let taken_before = taken();
    let recorded_before = tables.written(table_stats::HANDOFF_RECORDED)?;
    if handoff.moved(recorded_before, taken_before) {
        let left = distinct_keys(&tables.handoff)?;
        let (written, taken) = if first {
            (tables.written(table_stats::HANDOFF_RECORDED)?, taken_before)
        } else {
            (recorded_before, taken())
        };
        handoff.record(Ledger {
            written,
            taken,
            left,
        });
    }
    let created_before = tables.written(table_stats::REVERSE_CREATED)?;
    if reverse.moved(created_before, 0) {
        let left = distinct_keys(&tables.reverse)?;
        let written = if reverse.first.is_none() {
            tables.written(table_stats::REVERSE_CREATED)?
        } else {
            created_before
        };
        reverse.record(Ledger {
            written,
            taken: 0,
            left,
        });
    }
    Ok(TableCounts {
        handoff_records: handoff.last.left,
        handoff_records_evicted: handoff.evicted,
        handoff_record_failed: tables.written(table_stats::HANDOFF_RECORD_FAILED)?,
        reverse_entries: reverse.last.left,
        reverse_entries_evicted: reverse.evicted,
    })
}

/// The keys a walk finds, each once: a walk that loses its place to a concurrent delete starts
/// over from the first key.
fn distinct_keys<K: Pod + Eq + Hash, V: Pod>(
    map: &BpfHashMap<MapData, K, V>,
) -> Result<u64, MapError> {
    let keys = map.keys().collect::<Result<HashSet<K>, MapError>>()?;
    Ok(keys.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ledger(written: u64, taken: u64, left: u64) -> Ledger {
        Ledger {
            written,
            taken,
            left,
        }
    }

    #[test]
    fn what_was_written_and_is_neither_taken_nor_left_was_evicted() {
        // 10 written, 6 taken, 1 more left than at the start: 3 evicted.
        assert_eq!(evicted(ledger(100, 50, 4), ledger(110, 56, 5)), 3);
    }

    #[test]
    fn records_left_from_before_the_start_and_taken_since_are_no_evictions() {
        // Two records of an earlier daemon taken by this one's router, nothing written.
        assert_eq!(evicted(ledger(7, 0, 2), ledger(7, 2, 0)), 0);
    }

    #[test]
    fn an_lru_that_evicts_a_batch_counts_every_entry_of_it() {
        // A full table: one write made room for 128.
        assert_eq!(evicted(ledger(0, 0, 65_536), ledger(1, 0, 65_409)), 128);
    }

    #[test]
    fn a_count_that_raced_a_write_is_low_not_negative() {
        assert_eq!(evicted(ledger(5, 0, 0), ledger(5, 0, 3)), 0);
    }

    #[test]
    fn evictions_never_go_down() {
        let mut derived = Derived::default();
        derived.record(ledger(0, 0, 10));
        derived.record(ledger(5, 0, 10));
        assert_eq!(derived.evicted, 5);
        // A later count that raced writes (left counted high) does not take evictions back.
        derived.record(ledger(6, 0, 13));
        assert_eq!(derived.evicted, 5);
    }

    #[test]
    fn a_table_nobody_wrote_to_is_not_walked_again() {
        let mut derived = Derived::default();
        assert!(derived.moved(0, 0), "the first count always walks");
        derived.record(ledger(3, 1, 2));
        assert!(!derived.moved(3, 1));
        assert!(derived.moved(4, 1));
        assert!(derived.moved(3, 2));
    }
}
