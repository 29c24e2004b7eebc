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

use http::{HeaderMap, HeaderName};

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

    /// Finds the routing key of a request with these headers.
    pub fn extract(&self, headers: &HeaderMap) -> Extracted {
        let found = self
            .list_member(
                headers,
                &http::header::HeaderName::from_static("baggage"),
                true,
            )
            .or_else(|| {
                self.list_member(
                    headers,
                    &http::header::HeaderName::from_static("tracestate"),
                    false,
                )
            })
            .or_else(|| whole_value(headers, self.uberctx.as_ref(), true))
            .or_else(|| whole_value(headers, self.ot_baggage.as_ref(), false))
            .or_else(|| {
                self.extra
                    .iter()
                    .find_map(|h| whole_value(headers, Some(h), false))
            });
        match found {
            None => Extracted::Absent,
            Some(value) if validate(&value).is_ok() => Extracted::Key(value),
            Some(_) => Extracted::Invalid,
        }
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
            for member in text.split(',') {
                // Properties after ';' belong to the member, not to its value.
                let member = member.split(';').next().unwrap_or("");
                let Some((key, value)) = member.split_once('=') else {
                    continue;
                };
                if key.trim_matches(OWS) == self.name {
                    let value = value.trim_matches(OWS);
                    return Some(if decode {
                        percent_decode(value)?
                    } else {
                        value.to_owned()
                    });
                }
            }
        }
        None
    }
}

/// Optional whitespace around list members and `=` (RFC 9110 OWS).
const OWS: &[char] = &[' ', '\t'];

fn carrier_text(value: &http::HeaderValue) -> Option<&str> {
    if value.len() > MAX_CARRIER_BYTES {
        return None;
    }
    value.to_str().ok()
}

fn whole_value(headers: &HeaderMap, header: Option<&HeaderName>, decode: bool) -> Option<String> {
    let value = headers.get(header?)?;
    let text = carrier_text(value)?.trim_matches(OWS);
    if decode {
        percent_decode(text)
    } else {
        Some(text.to_owned())
    }
}

/// Percent-decodes; a value that does not decode to UTF-8 becomes an invalid (empty) key so it
/// is counted as invalid rather than skipped.
fn percent_decode(value: &str) -> Option<String> {
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
