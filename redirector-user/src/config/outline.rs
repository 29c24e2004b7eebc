//! What a file asks of the kernel maps, counted before it is built into values.
//!
//! Parsing TOML into values costs some 45 bytes of memory per byte of file (a file of 300 000
//! routes took half a gigabyte before the daemon could refuse it for capacity). This pass reads
//! the parser's events instead, keeping only counters and the key path it is at, so a file
//! far over capacity is refused for the price of lexing it.
//!
//! The counts are lower bounds of what the kernel would hold: every route, member path and
//! extra fork endpoint written in a sandbox (or a group's members), in any TOML form (arrays of
//! tables, inline tables, quoted keys). Routes that groups repeat are counted once the file is
//! built ([`entries`]). So a refusal here is never wrong, and the built state is checked
//! exactly.
use std::collections::HashSet;

use redirector_common::map_sizes;
use toml_parser::{
    ErrorSink, ParseError, Raw, Source, Span,
    decoder::Encoding,
    parser::{EventReceiver, RecursionGuard, parse_document},
};

use super::FieldError;
use crate::state::DesiredState;

/// Deeper than this the `toml` crate refuses the file anyway (its own limit is 80).
const MAX_DEPTH: u32 = 80;

/// The shape of a file, from [`scan`].
#[derive(Debug)]
pub struct Outline {
    /// Table headers and top-level key/value pairs: 0 for a file of only comments and
    /// whitespace.
    pub items: usize,
    /// The text is not valid TOML: the counts mean little, and the full parse says what is
    /// wrong.
    pub malformed: bool,
    pub routes: Tally,
    pub endpoints: Tally,
    pub members: Tally,
}

/// Entries of one map, and where the first that does not fit is written.
#[derive(Debug)]
pub struct Tally {
    pub count: usize,
    capacity: u32,
    /// Byte offset of the entry past the capacity.
    first_over: Option<usize>,
}

impl Tally {
    fn new(capacity: u32) -> Tally {
        Tally {
            count: 0,
            capacity,
            first_over: None,
        }
    }

    fn add(&mut self, at: usize) {
        self.count += 1;
        if self.count == self.capacity as usize + 1 {
            self.first_over = Some(at);
        }
    }
}

impl Default for Outline {
    fn default() -> Self {
        Outline {
            items: 0,
            malformed: false,
            routes: Tally::new(map_sizes::ROUTES),
            endpoints: Tally::new(map_sizes::ENDPOINTS),
            members: Tally::new(map_sizes::MEMBERS),
        }
    }
}

impl Outline {
    /// One located error per map the file overfills; `line_col` turns a byte offset into a
    /// location.
    pub fn over_capacity(&self, line_col: impl Fn(usize) -> (usize, usize)) -> Vec<FieldError> {
        [
            (
                "routes",
                "sandbox.routes",
                &self.routes,
                "the sandboxes have",
                "routes",
            ),
            (
                "endpoints",
                "sandbox.routes.forks",
                &self.endpoints,
                "the routes have",
                "fork endpoints beyond their first",
            ),
            (
                "members",
                "members",
                &self.members,
                "the sandboxes and groups list",
                "member paths",
            ),
        ]
        .into_iter()
        .filter_map(|(map, field, tally, whose, what)| {
            let (line, column) = line_col(tally.first_over?);
            Some(FieldError {
                line,
                column,
                field: field.to_owned(),
                message: map_full(
                    map,
                    &format!("{whose} {} {what}", tally.count),
                    tally.capacity,
                ),
            })
        })
        .collect()
    }
}

/// The same words as the daemon's own refusal (`SyncError::MapFull`), so that one search finds
/// both.
fn map_full(map: &str, needs: &str, capacity: u32) -> String {
    format!("map {map} is full: {needs}, the capacity is {capacity}")
}

/// Counts what `text` asks of the maps without building any value.
pub fn scan(text: &str) -> Outline {
    let source = Source::new(text);
    let tokens = source.lex().into_vec();
    let mut scanner = Scanner {
        source,
        outline: Outline::default(),
        keys: Vec::new(),
        table: Vec::new(),
        open: Vec::new(),
        value_path: None,
        key: String::new(),
    };
    let mut errors: Option<ParseError> = None;
    {
        let mut guarded = RecursionGuard::new(&mut scanner, MAX_DEPTH);
        parse_document(&tokens, &mut guarded, &mut errors);
    }
    scanner.outline.malformed |= errors.is_some();
    scanner.outline
}

/// The key names that matter here; every other name is `Other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Name {
    Sandbox,
    Group,
    Routes,
    Members,
    Forks,
    Other,
}

impl Name {
    fn of(key: &str) -> Name {
        match key {
            "sandbox" => Name::Sandbox,
            "group" => Name::Group,
            "routes" => Name::Routes,
            "members" => Name::Members,
            "forks" => Name::Forks,
            _ => Name::Other,
        }
    }
}

/// An open array or inline table, and the key path of the value it is. Array elements and
/// array-of-tables entries take their array's path: which element does not matter here.
struct Open {
    path: Vec<Name>,
    array: bool,
    /// Elements seen so far (arrays).
    len: usize,
}

struct Scanner<'s> {
    source: Source<'s>,
    outline: Outline,
    /// The dotted key being read: a table header's or a key/value pair's.
    keys: Vec<Name>,
    /// The path of the last table header: where top-level pairs go.
    table: Vec<Name>,
    /// Open arrays and inline tables, innermost last.
    open: Vec<Open>,
    /// The path the next value gets, set by `=`.
    value_path: Option<Vec<Name>>,
    /// Scratch for decoding quoted keys.
    key: String,
}

impl Scanner<'_> {
    /// An element of the array at `path`: its `index`, starting at `at`.
    fn element(&mut self, path: &[Name], index: usize, at: usize) {
        let outline = &mut self.outline;
        match path {
            [Name::Sandbox, Name::Routes] => outline.routes.add(at),
            [Name::Sandbox, Name::Routes, Name::Forks] if index > 0 => outline.endpoints.add(at),
            [Name::Sandbox | Name::Group, Name::Members] => outline.members.add(at),
            _ => {}
        }
    }

    /// A value starts at `at`: an array's next element, or the value of the last `key =`.
    fn value(&mut self, at: usize) -> Vec<Name> {
        match self.open.last_mut() {
            Some(open) if open.array => {
                let index = open.len;
                open.len += 1;
                let path = open.path.clone();
                self.element(&path, index, at);
                path
            }
            _ => self.value_path.take().unwrap_or_default(),
        }
    }

    fn header_open(&mut self) {
        self.outline.items += 1;
        self.keys.clear();
    }
}

impl EventReceiver for Scanner<'_> {
    fn std_table_open(&mut self, _span: Span, _error: &mut dyn ErrorSink) {
        self.header_open();
    }

    fn std_table_close(&mut self, _span: Span, _error: &mut dyn ErrorSink) {
        self.table = std::mem::take(&mut self.keys);
    }

    fn array_table_open(&mut self, _span: Span, _error: &mut dyn ErrorSink) {
        self.header_open();
    }

    fn array_table_close(&mut self, span: Span, _error: &mut dyn ErrorSink) {
        self.table = std::mem::take(&mut self.keys);
        // `[[sandbox.routes]]` is one more element of that array; its index is not known
        // without the whole document, and only fork endpoints care (never written this way).
        let path = self.table.clone();
        self.element(&path, 0, span.start());
    }

    fn inline_table_open(&mut self, span: Span, _error: &mut dyn ErrorSink) -> bool {
        let path = self.value(span.start());
        self.open.push(Open {
            path,
            array: false,
            len: 0,
        });
        true
    }

    fn inline_table_close(&mut self, _span: Span, _error: &mut dyn ErrorSink) {
        self.open.pop();
    }

    fn array_open(&mut self, span: Span, _error: &mut dyn ErrorSink) -> bool {
        let path = self.value(span.start());
        self.open.push(Open {
            path,
            array: true,
            len: 0,
        });
        true
    }

    fn array_close(&mut self, _span: Span, _error: &mut dyn ErrorSink) {
        self.open.pop();
    }

    fn simple_key(&mut self, span: Span, encoding: Option<Encoding>, error: &mut dyn ErrorSink) {
        let name = match encoding {
            None => Name::of(&self.source.input()[span.start()..span.end()]),
            Some(_) => {
                let text = &self.source.input()[span.start()..span.end()];
                self.key.clear();
                Raw::new_unchecked(text, encoding, span).decode_key(&mut self.key, error);
                Name::of(&self.key)
            }
        };
        self.keys.push(name);
    }

    fn key_val_sep(&mut self, _span: Span, _error: &mut dyn ErrorSink) {
        let base = match self.open.last() {
            Some(open) => &open.path,
            None => {
                self.outline.items += 1;
                &self.table
            }
        };
        let mut path = base.clone();
        path.append(&mut self.keys);
        self.value_path = Some(path);
    }

    fn scalar(&mut self, span: Span, _encoding: Option<Encoding>, _error: &mut dyn ErrorSink) {
        self.value(span.start());
    }

    fn error(&mut self, _span: Span, _error: &mut dyn ErrorSink) {
        self.outline.malformed = true;
    }
}

/// Entries the kernel maps need for `state`, counted as the kernel side encodes it, without
/// building the entries: (map, entries, capacity) for routes, endpoints, services, members.
pub fn entries(state: &DesiredState) -> [(&'static str, usize, u32); 4] {
    let mut routes = 0;
    let mut endpoints = 0;
    let mut members = 0;
    // Only services with a fork get an entry.
    let mut forked = HashSet::new();
    for sandbox in state.sandboxes.values() {
        members += sandbox.members.len();
        for (service, route) in &sandbox.routes {
            if state.services.contains_key(service) {
                forked.insert(service);
                routes += 1;
                endpoints += route.forks.len().saturating_sub(1);
            }
        }
    }
    // A group's key gets a copy of each of its sandboxes' routes.
    for group in state.groups.values() {
        members += group.members.len();
        for sandbox in group
            .sandboxes
            .iter()
            .filter_map(|k| state.sandboxes.get(k))
        {
            for (service, route) in &sandbox.routes {
                if state.services.contains_key(service) {
                    routes += 1;
                    endpoints += route.forks.len().saturating_sub(1);
                }
            }
        }
    }
    [
        ("routes", routes, map_sizes::ROUTES),
        ("endpoints", endpoints, map_sizes::ENDPOINTS),
        ("services", forked.len(), map_sizes::SERVICES),
        ("members", members, map_sizes::MEMBERS),
    ]
}

/// One error per map that `state` overfills. The count is the whole file's, so the error is
/// located at its top.
pub fn check_entries(state: &DesiredState) -> Vec<FieldError> {
    entries(state)
        .into_iter()
        .filter(|(_, needed, capacity)| *needed > *capacity as usize)
        .map(|(map, needed, capacity)| {
            let needs = match map {
                "services" => format!("the file forks {needed} services"),
                "members" => format!("the file lists {needed} member paths"),
                // Only here can the scan have counted fewer: groups' copies.
                _ => format!(
                    "the file needs {needed} entries (a group's key repeats its sandboxes' {map})"
                ),
            };
            FieldError {
                line: 1,
                column: 1,
                field: map.to_owned(),
                message: map_full(map, &needs, capacity),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(text: &str) -> (usize, usize, usize, usize) {
        let o = scan(text);
        assert!(!o.malformed, "{text}");
        (o.items, o.routes.count, o.endpoints.count, o.members.count)
    }

    #[test]
    fn nothing_but_comments_is_no_items() {
        assert_eq!(counts(""), (0, 0, 0, 0));
        assert_eq!(
            counts("  \n# only a comment\n\n\t# another\n"),
            (0, 0, 0, 0)
        );
        assert_eq!(counts("[daemon]\n").0, 1);
        assert_eq!(counts("service = []\n").0, 1);
    }

    #[test]
    fn counts_routes_members_and_endpoints_in_every_form() {
        let text = r#"
[[sandbox]]
key = "a"
members = ["/run/netns/a", "/run/netns/b"]
routes = [
  { service = "s1", fork = "10.0.0.1:80" },
  { service = "s2", forks = ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"] },
]

[[sandbox]]
key = "b"
[[sandbox.routes]]
service = "s1"
forks = ["10.0.0.1:80", "10.0.0.2:80"]
[[sandbox.routes]]
service = "s2"
fork = "10.0.0.1:80"

[[group]]
key = "g"
sandboxes = ["a", "b"]
members = ["/run/netns/c"]
"#;
        let (_, routes, endpoints, members) = counts(text);
        assert_eq!((routes, endpoints, members), (4, 3, 3));

        let inline = r#"sandbox = [{ key = "a", "routes" = [{ service = "s", forks = ["1.1.1.1:1", "1.1.1.2:1"] }], members = ["/x"] }]
group = [{ key = "g", sandboxes = ["a"], members = ["/y", "/z"] }]
"#;
        assert_eq!(counts(inline), (2, 1, 1, 3));

        let dotted = "[[sandbox]]\nkey = \"a\"\nroutes = [{ service = \"s\", fork = \"1.1.1.1:1\" }]\n[daemon]\nroutes = [1, 2]\n[[service]]\nmembers = [1]\n";
        assert_eq!(counts(dotted).1, 1, "routes elsewhere are not routes");
    }

    #[test]
    fn the_entry_past_capacity_is_located() {
        let mut text = String::from("[[sandbox]]\nkey = \"a\"\nmembers = [\n");
        for i in 0..=map_sizes::MEMBERS {
            text.push_str(&format!("\"/run/netns/p{i}\",\n"));
        }
        text.push_str("]\n");
        let outline = scan(&text);
        let errors = outline.over_capacity(|at| super::super::line_col(&text, at));
        assert_eq!(errors.len(), 1, "{errors:?}");
        let e = &errors[0];
        // The first path is on line 4: the one past capacity is MEMBERS lines further.
        assert_eq!(
            (e.line, e.column, e.field.as_str()),
            (4 + map_sizes::MEMBERS as usize, 1, "members")
        );
        assert_eq!(
            e.message,
            format!(
                "map members is full: the sandboxes and groups list {} member paths, the \
                 capacity is {}",
                map_sizes::MEMBERS + 1,
                map_sizes::MEMBERS
            )
        );
    }

    #[test]
    fn broken_toml_is_marked_malformed() {
        assert!(scan("[[service]\nname = ").malformed);
        assert!(scan("a = [1,\n").malformed);
        let deep = format!("a = {}{}", "[".repeat(200), "]".repeat(200));
        assert!(scan(&deep).malformed, "too deep for the toml crate too");
    }
}
