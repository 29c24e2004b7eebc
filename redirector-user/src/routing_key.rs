//! Sandbox routing keys: what a valid key looks like, and where a request carries one.
//!
//! Keys travel in request headers and name sandboxes in the config, the API and the CLI; the
//! same rule applies everywhere: 1 to 63 characters of `[A-Za-z0-9._-]`.
//!
//! Carriers, checked in this order, first match wins (`NAME` is the configured key name,
//! `sd-routing-key` by default, the name Signadot uses, so existing propagation works):
//! 1. `baggage: ..., NAME=K;props, ...` (W3C Baggage; values percent-decoded, properties ignored)
//! 2. `tracestate: ..., NAME=K, ...`
//! 3. `uberctx-NAME: K` (Jaeger baggage; percent-decoded)
//! 4. `ot-baggage-NAME: K` (OpenTracing baggage)
//! 5. each configured extra header, whose whole value is the key.
//!
//! A carrier that names the key with an invalid value yields [`Extracted::Invalid`]: the request
//! is routed as if it had no key (and counted), never to a guessed sandbox.
//!
//! An HTTP service may also take the key from a query parameter and a cookie named `NAME`
//! (`key_from`, see [`KeySources`] and the `edge` module); headers win over the query parameter,
//! the query parameter over the cookie, and the first of them that names the key decides, valid
//! or not.
mod edge;

use std::time::Duration;

use http::{HeaderMap, HeaderName, Request};

pub use self::edge::{add_to_baggage, set_cookie};

/// Longest accepted key, in bytes.
pub const MAX_KEY_LEN: usize = 63;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("routing key is empty")]
    Empty,
    #[error("routing key is {len} characters long; the limit is {MAX_KEY_LEN}")]
    TooLong { len: usize },
    #[error("routing key contains {found:?}; only letters, digits, '.', '_' and '-' are allowed")]
    InvalidChar { found: char },
}

/// Checks `key` against the routing-key rule.
pub fn validate(key: &str) -> Result<(), KeyError> {
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    if let Some(found) = key
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(KeyError::InvalidChar { found });
    }
    if key.len() > MAX_KEY_LEN {
        return Err(KeyError::TooLong { len: key.len() });
    }
    Ok(())
}

/// Header values longer than this are not parsed (W3C Baggage caps a header at 8192 bytes):
/// bounds the work an adversarial request can cause.
pub const MAX_CARRIER_BYTES: usize = 8192;

/// What a request says about its routing key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Extracted {
    Key(String),
    /// A carrier named the key but its value is not a valid key.
    Invalid,
    Absent,
}

/// A place in a request that can carry the key, as `key_from` names it; the order here is the
/// order of precedence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyFrom {
    /// The header carriers listed above.
    Header,
    /// A query parameter `NAME` (percent-decoded).
    Query,
    /// A cookie `NAME`.
    Cookie,
}

impl KeyFrom {
    pub const ALL: [KeyFrom; 3] = [KeyFrom::Header, KeyFrom::Query, KeyFrom::Cookie];

    pub fn name(self) -> &'static str {
        match self {
            KeyFrom::Header => "header",
            KeyFrom::Query => "query",
            KeyFrom::Cookie => "cookie",
        }
    }

    pub fn from_name(name: &str) -> Option<KeyFrom> {
        KeyFrom::ALL.into_iter().find(|k| k.name() == name)
    }
}

/// Max-Age of the routing-key cookie when the config does not say.
pub const DEFAULT_COOKIE_MAX_AGE: Duration = Duration::from_secs(3600);

/// Where one HTTP service's requests may carry the key, and whether a key that arrives by query
/// parameter is handed back as a cookie. The default, headers only, parses nothing else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeySources {
    pub header: bool,
    pub query: bool,
    pub cookie: bool,
    /// Max-Age of the `Set-Cookie` added to the response of a request whose key came by query
    /// parameter; None: no cookie is set.
    pub set_cookie: Option<Duration>,
}

impl Default for KeySources {
    fn default() -> Self {
        KeySources {
            header: true,
            query: false,
            cookie: false,
            set_cookie: None,
        }
    }
}

impl KeySources {
    pub fn takes(&self, from: KeyFrom) -> bool {
        match from {
            KeyFrom::Header => self.header,
            KeyFrom::Query => self.query,
            KeyFrom::Cookie => self.cookie,
        }
    }
}

/// The key of a request and the carrier it came in (None when [`Extracted::Absent`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub key: Extracted,
    pub via: Option<KeyFrom>,
}

impl Found {
    pub fn absent() -> Found {
        Found {
            key: Extracted::Absent,
            via: None,
        }
    }

    /// The valid key, when it came by query parameter or cookie: the router passes it on in
    /// `baggage`, since nothing behind the service would read it there.
    pub fn from_edge(&self) -> Option<&str> {
        match (&self.key, self.via) {
            (Extracted::Key(key), Some(KeyFrom::Query | KeyFrom::Cookie)) => Some(key),
            _ => None,
        }
    }
}

/// Where keys are looked for, built once from the router settings.
#[derive(Debug, Clone)]
pub struct Carriers {
    name: String,
    uberctx: Option<HeaderName>,
    ot_baggage: Option<HeaderName>,
    extra: Vec<HeaderName>,
}

impl Carriers {
    pub fn new(key_name: &str, extra: &[HeaderName]) -> Carriers {
        Carriers {
            name: key_name.to_owned(),
            uberctx: HeaderName::from_bytes(format!("uberctx-{key_name}").as_bytes()).ok(),
            ot_baggage: HeaderName::from_bytes(format!("ot-baggage-{key_name}").as_bytes()).ok(),
            extra: extra.to_vec(),
        }
    }

    /// The configured key name: the baggage key, and the query parameter's and cookie's name.
    pub fn key_name(&self) -> &str {
        &self.name
    }

    /// Finds the routing key of `req` in the carriers `sources` allows, in the order of
    /// [`KeyFrom`]; the first carrier that names the key decides, even with an invalid value.
    /// Reads the request head only, never the body. With the default sources (headers only)
    /// neither the query nor the cookies are looked at.
    pub fn find<B>(&self, req: &Request<B>, sources: &KeySources) -> Found {
        for from in KeyFrom::ALL {
            if !sources.takes(from) {
                continue;
            }
            let key = match from {
                KeyFrom::Header => self.extract(req.headers()),
                KeyFrom::Query => req
                    .uri()
                    .query()
                    .map_or(Extracted::Absent, |q| edge::from_query(q, &self.name)),
                KeyFrom::Cookie => edge::from_cookies(req.headers(), &self.name),
            };
            if key != Extracted::Absent {
                return Found {
                    key,
                    via: Some(from),
                };
            }
        }
        Found::absent()
    }

    /// Finds the routing key of a request with these headers (the header carriers only).
    pub fn extract(&self, headers: &HeaderMap) -> Extracted {
        let found = self
            .list_member(headers, &BAGGAGE, true)
            .or_else(|| self.list_member(headers, &TRACESTATE, false))
            .or_else(|| whole_value(headers, self.uberctx.as_ref(), true))
            .or_else(|| whole_value(headers, self.ot_baggage.as_ref(), false))
            .or_else(|| {
                self.extra
                    .iter()
                    .find_map(|h| whole_value(headers, Some(h), false))
            });
        found.map_or(Extracted::Absent, judge)
    }

    /// The value of list member `NAME=value` in a comma-separated list header (`baggage`,
    /// `tracestate`), across every instance of the header, first one wins.
    fn list_member(
        &self,
        headers: &HeaderMap,
        header: &HeaderName,
        decode: bool,
    ) -> Option<String> {
        for value in headers.get_all(header) {
            let Some(text) = carrier_text(value) else {
                continue;
            };
            if let Some((_, value)) = list_members(text).find(|(key, _)| *key == self.name) {
                return if decode {
                    percent_decode(value)
                } else {
                    Some(value.to_owned())
                };
            }
        }
        None
    }
}

const BAGGAGE: HeaderName = HeaderName::from_static("baggage");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// A carrier's value judged: a valid key, or a present but invalid one.
fn judge(value: String) -> Extracted {
    if validate(&value).is_ok() {
        Extracted::Key(value)
    } else {
        Extracted::Invalid
    }
}

/// The `(key, value)` of each `key=value` member of a comma-separated list (`baggage`,
/// `tracestate`), whitespace trimmed, properties after `;` dropped; members without `=` are
/// skipped.
fn list_members(text: &str) -> impl Iterator<Item = (&str, &str)> {
    text.split(',').filter_map(|member| {
        // Properties after ';' belong to the member, not to its value.
        let member = member.split(';').next().unwrap_or("");
        let (key, value) = member.split_once('=')?;
        Some((trim_ows(key), trim_ows(value)))
    })
}

/// Optional whitespace around list members and `=` (RFC 9110 OWS).
const OWS: &[char] = &[' ', '\t'];

/// `text.trim_matches(OWS)`, with a closure: the slice pattern's generic search cost more than
/// the rest of the carrier's parsing.
fn trim_ows(text: &str) -> &str {
    text.trim_matches(|c| c == ' ' || c == '\t')
}

fn carrier_text(value: &http::HeaderValue) -> Option<&str> {
    if value.len() > MAX_CARRIER_BYTES {
        return None;
    }
    value.to_str().ok()
}

fn whole_value(headers: &HeaderMap, header: Option<&HeaderName>, decode: bool) -> Option<String> {
    let value = headers.get(header?)?;
    let text = trim_ows(carrier_text(value)?);
    if decode {
        percent_decode(text)
    } else {
        Some(text.to_owned())
    }
}

/// Percent-decodes; a value that does not decode to UTF-8 becomes an invalid (empty) key so it
/// is counted as invalid rather than skipped.
fn percent_decode(value: &str) -> Option<String> {
    if !value.contains('%') {
        // Nothing to decode (the usual case): skips the decoder's pass and its UTF-8 check.
        return Some(value.to_owned());
    }
    Some(
        percent_encoding::percent_decode_str(value)
            .decode_utf8()
            .map(|v| v.into_owned())
            .unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                http::HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    fn extract(pairs: &[(&str, &str)]) -> Extracted {
        Carriers::new("sd-routing-key", &[HeaderName::from_static("x-sandbox")])
            .extract(&headers(pairs))
    }

    fn key(k: &str) -> Extracted {
        Extracted::Key(k.to_owned())
    }

    #[test]
    fn baggage_member_with_whitespace_and_properties() {
        assert_eq!(extract(&[("baggage", "sd-routing-key=pr-1")]), key("pr-1"));
        assert_eq!(
            extract(&[(
                "baggage",
                "userId=alice , sd-routing-key = pr-2 ;ttl=3;x ,other=1"
            )]),
            key("pr-2")
        );
        assert_eq!(
            extract(&[("baggage", "\tsd-routing-key\t=\tpr-3\t")]),
            key("pr-3")
        );
    }

    #[test]
    fn baggage_values_are_percent_decoded() {
        assert_eq!(
            extract(&[("baggage", "sd-routing-key=pr%2D4")]),
            key("pr-4")
        );
        // Decodes to a space: not a valid key.
        assert_eq!(
            extract(&[("baggage", "sd-routing-key=pr%204")]),
            Extracted::Invalid
        );
        // Not UTF-8 once decoded.
        assert_eq!(
            extract(&[("baggage", "sd-routing-key=%ff")]),
            Extracted::Invalid
        );
    }

    #[test]
    fn several_baggage_headers_first_member_wins() {
        assert_eq!(
            extract(&[
                ("baggage", "a=1"),
                ("baggage", "sd-routing-key=pr-5"),
                ("baggage", "sd-routing-key=pr-6")
            ]),
            key("pr-5")
        );
        assert_eq!(
            extract(&[("baggage", "sd-routing-key=pr-7,sd-routing-key=pr-8")]),
            key("pr-7")
        );
    }

    #[test]
    fn header_names_are_case_insensitive_keys_are_not() {
        assert_eq!(extract(&[("BAGGAGE", "sd-routing-key=pr-9")]), key("pr-9"));
        assert_eq!(
            extract(&[("Uberctx-SD-Routing-Key", "pr-10")]),
            key("pr-10")
        );
        // Baggage keys are case-sensitive (W3C): a differently cased member is another key.
        assert_eq!(
            extract(&[("baggage", "SD-ROUTING-KEY=pr-11")]),
            Extracted::Absent
        );
    }

    #[test]
    fn carriers_in_order() {
        let all = [
            ("x-sandbox", "e"),
            ("ot-baggage-sd-routing-key", "d"),
            ("uberctx-sd-routing-key", "c"),
            ("tracestate", "vendor=x,sd-routing-key=b"),
            ("baggage", "sd-routing-key=a"),
        ];
        for (n, expected) in ["a", "b", "c", "d", "e"].iter().enumerate() {
            assert_eq!(
                extract(&all[..all.len() - n]),
                key(expected),
                "without the first {n}"
            );
        }
    }

    #[test]
    fn first_match_decides_even_when_invalid() {
        assert_eq!(
            extract(&[
                ("baggage", "sd-routing-key=bad key"),
                ("uberctx-sd-routing-key", "pr-1")
            ]),
            Extracted::Invalid
        );
        assert_eq!(
            extract(&[("baggage", "sd-routing-key=")]),
            Extracted::Invalid
        );
        assert_eq!(
            extract(&[("x-sandbox", &"k".repeat(64))]),
            Extracted::Invalid
        );
    }

    #[test]
    fn absent_when_nothing_names_the_key() {
        assert_eq!(extract(&[]), Extracted::Absent);
        assert_eq!(
            extract(&[("baggage", "other=1;sd-routing-key=pr-1")]),
            Extracted::Absent
        );
        assert_eq!(
            extract(&[("baggage", "sd-routing-keyx=pr-1,nokey")]),
            Extracted::Absent
        );
        assert_eq!(extract(&[("x-other", "pr-1")]), Extracted::Absent);
    }

    #[test]
    fn oversized_carriers_are_not_parsed() {
        let huge = format!(
            "{},sd-routing-key=pr-1",
            "a=b,".repeat(MAX_CARRIER_BYTES / 4)
        );
        assert_eq!(extract(&[("baggage", &huge)]), Extracted::Absent);
        // ... and do not hide a later carrier.
        assert_eq!(
            extract(&[("baggage", &huge), ("uberctx-sd-routing-key", "pr-2")]),
            key("pr-2")
        );
    }

    #[test]
    fn configured_key_name() {
        let carriers = Carriers::new("tenant", &[]);
        assert_eq!(
            carriers.extract(&headers(&[("baggage", "sd-routing-key=a,tenant=t-1")])),
            key("t-1")
        );
        assert_eq!(
            carriers.extract(&headers(&[("uberctx-tenant", "t-2")])),
            key("t-2")
        );
        assert_eq!(
            carriers.extract(&headers(&[("ot-baggage-tenant", "t-3")])),
            key("t-3")
        );
    }

    fn request(uri: &str, pairs: &[(&str, &str)], body: &str) -> Request<String> {
        let mut req = Request::builder().uri(uri).body(body.to_owned()).unwrap();
        *req.headers_mut() = headers(pairs);
        req
    }

    fn all_sources() -> KeySources {
        KeySources {
            query: true,
            cookie: true,
            ..KeySources::default()
        }
    }

    fn find(sources: &KeySources, uri: &str, pairs: &[(&str, &str)]) -> Found {
        Carriers::new("sd-routing-key", &[]).find(&request(uri, pairs, ""), sources)
    }

    fn found(k: &str, via: KeyFrom) -> Found {
        Found {
            key: key(k),
            via: Some(via),
        }
    }

    #[test]
    fn by_default_only_headers_carry_the_key() {
        let default = KeySources::default();
        let cookie = [("cookie", "sd-routing-key=pr-2")];
        assert_eq!(
            find(&default, "/x?sd-routing-key=pr-1", &cookie),
            Found::absent()
        );
        assert_eq!(
            find(
                &default,
                "/x?sd-routing-key=pr-1",
                &[("baggage", "sd-routing-key=pr-3")]
            ),
            found("pr-3", KeyFrom::Header)
        );
    }

    #[test]
    fn header_wins_over_query_query_over_cookie() {
        let all = all_sources();
        let cookie = ("cookie", "sd-routing-key=pr-3");
        let header = ("uberctx-sd-routing-key", "pr-1");
        let uri = "http://svc/x?a=1&sd-routing-key=pr-2";
        assert_eq!(
            find(&all, uri, &[cookie, header]),
            found("pr-1", KeyFrom::Header)
        );
        assert_eq!(find(&all, uri, &[cookie]), found("pr-2", KeyFrom::Query));
        assert_eq!(
            find(&all, "/x?a=1", &[cookie]),
            found("pr-3", KeyFrom::Cookie)
        );
        assert_eq!(find(&all, "/x", &[cookie]), found("pr-3", KeyFrom::Cookie));
        assert_eq!(find(&all, "/x?a=1", &[]), Found::absent());
        // The same key in header and query: the header's, and no second-guessing.
        assert_eq!(
            find(
                &all,
                "/x?sd-routing-key=pr-1",
                &[("baggage", "sd-routing-key=pr-1")]
            ),
            found("pr-1", KeyFrom::Header)
        );
        // A carrier that is not enabled is skipped, not an error.
        let query_only = KeySources {
            header: false,
            query: true,
            ..KeySources::default()
        };
        assert_eq!(
            find(&query_only, uri, &[header]),
            found("pr-2", KeyFrom::Query)
        );
        let cookie_only = KeySources {
            header: false,
            cookie: true,
            ..KeySources::default()
        };
        assert_eq!(
            find(&cookie_only, uri, &[cookie, header]),
            found("pr-3", KeyFrom::Cookie)
        );
    }

    #[test]
    fn an_invalid_key_in_the_winning_carrier_decides() {
        let all = all_sources();
        let invalid = |via| Found {
            key: Extracted::Invalid,
            via: Some(via),
        };
        assert_eq!(
            find(
                &all,
                "/x?sd-routing-key=pr-2",
                &[("baggage", "sd-routing-key=bad key")]
            ),
            invalid(KeyFrom::Header)
        );
        assert_eq!(
            find(
                &all,
                "/x?sd-routing-key=bad%20key",
                &[("cookie", "sd-routing-key=pr-3")]
            ),
            invalid(KeyFrom::Query)
        );
        assert_eq!(
            find(
                &all,
                "/x?sd-routing-key=pr-1&sd-routing-key=pr-2",
                &[("cookie", "sd-routing-key=pr-3")]
            ),
            invalid(KeyFrom::Query)
        );
        assert_eq!(
            find(&all, "/x", &[("cookie", "sd-routing-key=pr 3")]),
            invalid(KeyFrom::Cookie)
        );
    }

    #[test]
    fn a_post_form_body_is_never_read() {
        let req = request(
            "/submit",
            &[("content-type", "application/x-www-form-urlencoded")],
            "sd-routing-key=pr-1",
        );
        let carriers = Carriers::new("sd-routing-key", &[]);
        assert_eq!(carriers.find(&req, &all_sources()), Found::absent());
        // Only the query of the URI counts, for a POST as for a GET.
        let req = request(
            "/submit?sd-routing-key=pr-2",
            &[("content-type", "application/x-www-form-urlencoded")],
            "sd-routing-key=pr-1",
        );
        assert_eq!(
            carriers.find(&req, &all_sources()),
            found("pr-2", KeyFrom::Query)
        );
    }

    #[test]
    fn the_configured_key_name_names_the_parameter_and_the_cookie() {
        let carriers = Carriers::new("tenant", &[]);
        let all = all_sources();
        let req = request("/x?sd-routing-key=a&tenant=t-1", &[], "");
        assert_eq!(carriers.find(&req, &all), found("t-1", KeyFrom::Query));
        let req = request("/x", &[("cookie", "sd-routing-key=a; tenant=t-2")], "");
        assert_eq!(carriers.find(&req, &all), found("t-2", KeyFrom::Cookie));
    }

    #[test]
    fn only_keys_from_the_edge_travel_on_in_baggage() {
        assert_eq!(found("pr-1", KeyFrom::Query).from_edge(), Some("pr-1"));
        assert_eq!(found("pr-1", KeyFrom::Cookie).from_edge(), Some("pr-1"));
        assert_eq!(found("pr-1", KeyFrom::Header).from_edge(), None);
        let invalid = Found {
            key: Extracted::Invalid,
            via: Some(KeyFrom::Query),
        };
        assert_eq!(invalid.from_edge(), None);
        assert_eq!(Found::absent().from_edge(), None);
    }

    #[test]
    fn key_from_names() {
        for from in KeyFrom::ALL {
            assert_eq!(KeyFrom::from_name(from.name()), Some(from));
        }
        assert_eq!(KeyFrom::from_name("form"), None);
        assert_eq!(KeyFrom::from_name("Header"), None);
    }

    #[test]
    fn accepts_the_allowed_alphabet() {
        for key in ["pr-123", "a", "A.b_c-9", &"k".repeat(MAX_KEY_LEN)] {
            assert_eq!(validate(key), Ok(()), "{key}");
        }
    }

    #[test]
    fn rejects_empty_long_and_foreign_characters() {
        assert_eq!(validate(""), Err(KeyError::Empty));
        assert_eq!(
            validate(&"k".repeat(MAX_KEY_LEN + 1)),
            Err(KeyError::TooLong { len: 64 })
        );
        assert_eq!(validate("pr 1"), Err(KeyError::InvalidChar { found: ' ' }));
        assert_eq!(validate("pr/1"), Err(KeyError::InvalidChar { found: '/' }));
        assert_eq!(validate("prü"), Err(KeyError::InvalidChar { found: 'ü' }));
        assert_eq!(validate("a=b"), Err(KeyError::InvalidChar { found: '=' }));
    }
}
