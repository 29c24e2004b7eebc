//! Carriers for clients that cannot set headers (browsers, third-party webhooks): a query
//! parameter and a cookie named like the key, each enabled per HTTP service (`key_from`), and
//! what the router adds so that a key that arrived this way keeps travelling: a `baggage` list
//! member on the request it forwards, and optionally a cookie on the response.
//!
//! Only the request head is read: a form body that names the key is never parsed.
use std::{borrow::Cow, time::Duration};

use cookie::{Cookie, SameSite};
use http::{HeaderMap, HeaderValue, header};

use super::{Extracted, MAX_CARRIER_BYTES, OWS, judge, list_members};

/// The key in query parameter `name` of `query` (the URI after `?`, without the fragment),
/// percent-decoded (`+` is a space, as in HTML forms) before it is judged.
///
/// Several parameters of that name must agree: one whose values differ is [`Extracted::Invalid`]
/// (the request goes to the baseline, counted), because the application behind the router may
/// read another one than the first and the two would disagree on the sandbox. Repeats of one
/// value are accepted.
pub fn from_query(query: &str, name: &str) -> Extracted {
    let mut found: Option<Cow<'_, str>> = None;
    for (param, value) in form_urlencoded::parse(query.as_bytes()) {
        if param != name {
            continue;
        }
        match &found {
            None => found = Some(value),
            Some(first) if *first == value => {}
            Some(_) => return Extracted::Invalid,
        }
    }
    found.map_or(Extracted::Absent, |value| judge(value.into_owned()))
}

/// The key in the cookie `name` of the request's `Cookie` headers (HTTP/2 clients may send
/// one header per cookie), first one wins: browsers send the cookie of the most specific path
/// first. A value in double quotes is unquoted; cookie values are not percent-decoded.
pub fn from_cookies(headers: &HeaderMap, name: &str) -> Extracted {
    for value in headers.get_all(header::COOKIE) {
        // Other applications' cookies may hold any bytes; ours is ASCII whatever they hold.
        let text = String::from_utf8_lossy(value.as_bytes());
        for cookie in Cookie::split_parse(text).flatten() {
            if cookie.name() == name {
                return judge(cookie.value_trimmed().to_owned());
            }
        }
    }
    Extracted::Absent
}

/// Adds the list member `name=key` to the request's W3C `baggage`, unless a member called
/// `name` is there already (whatever its value: the client's own baggage is not rewritten).
///
/// The member joins the first `baggage` header, so that propagators reading only one header
/// see it; when that would take the header over [`MAX_CARRIER_BYTES`] (where routers stop
/// parsing it), it goes in a `baggage` header of its own instead, which W3C Baggage allows.
/// `key` must be a valid key: its characters need no percent-encoding.
pub fn add_to_baggage(headers: &mut HeaderMap, name: &str, key: &str) {
    let present = headers
        .get_all(header::HeaderName::from_static("baggage"))
        .iter()
        .any(|value| {
            list_members(&String::from_utf8_lossy(value.as_bytes()))
                .any(|(member, _)| member == name)
        });
    if present {
        return;
    }
    let member = format!("{name}={key}");
    if let Some(first) = headers.get_mut("baggage") {
        let mut existing = first.as_bytes();
        // A trailing comma or whitespace would leave an empty member before ours.
        while let [rest @ .., last] = existing
            && (*last == b',' || OWS.contains(&char::from(*last)))
        {
            existing = rest;
        }
        if existing.iter().all(|b| OWS.contains(&char::from(*b))) {
            if let Ok(value) = HeaderValue::from_str(&member) {
                *first = value;
            }
            return;
        }
        if existing.len() + 1 + member.len() <= MAX_CARRIER_BYTES {
            let joined = [existing, b",", member.as_bytes()].concat();
            if let Ok(value) = HeaderValue::from_bytes(&joined) {
                *first = value;
                return;
            }
        }
    }
    if let Ok(value) = HeaderValue::from_str(&member) {
        headers.append(header::HeaderName::from_static("baggage"), value);
    }
}

/// `Set-Cookie: NAME=KEY; HttpOnly; SameSite=Lax; Path=/; Max-Age=SECONDS`: keeps a browser
/// session that arrived with the key in its URL in the sandbox. Not `Secure`: the router speaks
/// plain HTTP, and a browser would not send a Secure cookie back over it.
pub fn set_cookie(name: &str, key: &str, max_age: Duration) -> Option<HeaderValue> {
    let seconds = i64::try_from(max_age.as_secs()).ok()?;
    let cookie = Cookie::build((name, key))
        .path("/")
        .http_only(true)
        .same_site(SameSite::Lax)
        .max_age(cookie::time::Duration::seconds(seconds))
        .build();
    HeaderValue::from_str(&cookie.to_string()).ok()
}

#[cfg(test)]
mod tests {
    use http::HeaderName;

    use super::*;

    const NAME: &str = "sd-routing-key";

    fn key(k: &str) -> Extracted {
        Extracted::Key(k.to_owned())
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    #[test]
    fn query_parameter_among_others() {
        assert_eq!(from_query("sd-routing-key=pr-1", NAME), key("pr-1"));
        assert_eq!(from_query("a=1&sd-routing-key=pr-2&b=", NAME), key("pr-2"));
        assert_eq!(
            from_query("a=1;sd-routing-key=pr-3", NAME),
            Extracted::Absent
        );
        assert_eq!(from_query("", NAME), Extracted::Absent);
        assert_eq!(
            from_query("sd-routing-keyx=pr-1&x=sd-routing-key", NAME),
            Extracted::Absent
        );
        // Names are case-sensitive, as the baggage key is.
        assert_eq!(from_query("SD-ROUTING-KEY=pr-1", NAME), Extracted::Absent);
    }

    #[test]
    fn query_values_and_names_are_percent_decoded_before_validation() {
        assert_eq!(from_query("sd-routing-key=pr%2D4", NAME), key("pr-4"));
        assert_eq!(from_query("sd%2Drouting%2Dkey=pr-5", NAME), key("pr-5"));
        // Decodes to a space, or to a character outside the key alphabet: present, invalid.
        assert_eq!(
            from_query("sd-routing-key=pr%204", NAME),
            Extracted::Invalid
        );
        assert_eq!(from_query("sd-routing-key=pr+4", NAME), Extracted::Invalid);
        assert_eq!(
            from_query("sd-routing-key=pr%2F4", NAME),
            Extracted::Invalid
        );
        // Not UTF-8 once decoded, or a bare name: present, invalid.
        assert_eq!(from_query("sd-routing-key=%ff", NAME), Extracted::Invalid);
        assert_eq!(from_query("sd-routing-key", NAME), Extracted::Invalid);
        assert_eq!(from_query("sd-routing-key=", NAME), Extracted::Invalid);
        assert_eq!(
            from_query(&format!("sd-routing-key={}", "k".repeat(64)), NAME),
            Extracted::Invalid
        );
    }

    #[test]
    fn several_query_parameters_must_agree() {
        assert_eq!(
            from_query("sd-routing-key=pr-1&x=1&sd-routing-key=pr-1", NAME),
            key("pr-1")
        );
        assert_eq!(
            from_query("sd-routing-key=pr-1&sd-routing-key=pr%2D1", NAME),
            key("pr-1"),
            "the same key once decoded"
        );
        assert_eq!(
            from_query("sd-routing-key=pr-1&sd-routing-key=pr-2", NAME),
            Extracted::Invalid
        );
        assert_eq!(
            from_query("sd-routing-key=pr-1&sd-routing-key=", NAME),
            Extracted::Invalid
        );
    }

    #[test]
    fn cookie_among_several_pairs_with_spaces_and_quotes() {
        let from = |value: &str| from_cookies(&headers(&[("cookie", value)]), NAME);
        assert_eq!(from("sd-routing-key=pr-1"), key("pr-1"));
        assert_eq!(
            from("session=abc; sd-routing-key=pr-2; theme=dark"),
            key("pr-2")
        );
        assert_eq!(from("a=1;sd-routing-key=pr-3;b=2"), key("pr-3"));
        assert_eq!(from("a=1 ;  sd-routing-key = pr-4  ; b=2"), key("pr-4"));
        assert_eq!(from("a=1;; sd-routing-key=pr-5"), key("pr-5"));
        assert_eq!(from("sd-routing-key=\"pr-6\""), key("pr-6"));
        assert_eq!(
            from("junk; sd-routing-key=pr-7"),
            key("pr-7"),
            "a pair without '=' is skipped"
        );
        // `;` ends a pair even in quotes: `b"` is a pair without '=', skipped.
        assert_eq!(from("x=\"a;b\"; sd-routing-key=pr-8"), key("pr-8"));
        // Not percent-decoded, unlike the query parameter.
        assert_eq!(from("sd-routing-key=pr%2D9"), Extracted::Invalid);
        assert_eq!(from("sd-routing-key="), Extracted::Invalid);
        assert_eq!(from("sd-routing-key=\"\""), Extracted::Invalid);
        assert_eq!(
            from("SD-ROUTING-KEY=pr-1; sd-routing-keys=pr-1"),
            Extracted::Absent
        );
    }

    #[test]
    fn first_cookie_wins_across_headers() {
        // Browsers list the cookie of the longest path first.
        let h = headers(&[("cookie", "a=1; sd-routing-key=pr-1; sd-routing-key=pr-2")]);
        assert_eq!(from_cookies(&h, NAME), key("pr-1"));
        // HTTP/2 clients may split cookies over several headers.
        let h = headers(&[
            ("cookie", "a=1"),
            ("cookie", "sd-routing-key=pr-3"),
            ("cookie", "sd-routing-key=pr-4"),
        ]);
        assert_eq!(from_cookies(&h, NAME), key("pr-3"));
        // An invalid first one decides.
        let h = headers(&[("cookie", "sd-routing-key=bad!; sd-routing-key=pr-5")]);
        assert_eq!(from_cookies(&h, NAME), Extracted::Invalid);
        assert_eq!(from_cookies(&HeaderMap::new(), NAME), Extracted::Absent);
    }

    #[test]
    fn a_cookie_header_that_is_not_utf8_still_yields_the_key() {
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            HeaderValue::from_bytes(b"other=\xe9t\xe9; sd-routing-key=pr-1").unwrap(),
        );
        assert_eq!(from_cookies(&h, NAME), key("pr-1"));
    }

    fn baggage_after(pairs: &[(&str, &str)]) -> Vec<String> {
        let mut h = headers(pairs);
        add_to_baggage(&mut h, NAME, "pr-1");
        h.get_all("baggage")
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect()
    }

    #[test]
    fn baggage_gets_the_member_once() {
        assert_eq!(baggage_after(&[]), ["sd-routing-key=pr-1"]);
        assert_eq!(
            baggage_after(&[("baggage", "a=1")]),
            ["a=1,sd-routing-key=pr-1"]
        );
        assert_eq!(
            baggage_after(&[("baggage", "a=1;p=2 , b=2 ,"), ("baggage", "c=3")]),
            ["a=1;p=2 , b=2,sd-routing-key=pr-1", "c=3"]
        );
        assert_eq!(
            baggage_after(&[("baggage", " , ")]),
            ["sd-routing-key=pr-1"]
        );
        // Already there, in any header and with any value: left as it is.
        assert_eq!(
            baggage_after(&[("baggage", "a=1"), ("baggage", "sd-routing-key = pr-1;p")]),
            ["a=1", "sd-routing-key = pr-1;p"]
        );
        assert_eq!(
            baggage_after(&[("baggage", "sd-routing-key=pr-2")]),
            ["sd-routing-key=pr-2"]
        );
        // Other headers are untouched.
        let mut h = headers(&[("tracestate", "x=1"), ("baggage", "a=1")]);
        add_to_baggage(&mut h, NAME, "pr-1");
        assert_eq!(h["tracestate"], "x=1");
    }

    #[test]
    fn a_full_baggage_header_gets_a_second_one() {
        let full = format!("a={}", "b".repeat(MAX_CARRIER_BYTES - 10));
        assert_eq!(
            baggage_after(&[("baggage", &full)]),
            [full.clone(), "sd-routing-key=pr-1".to_owned()]
        );
        // ... which the routers' own parser reads.
        let mut h = headers(&[("baggage", &full)]);
        add_to_baggage(&mut h, NAME, "pr-1");
        assert_eq!(
            super::super::Carriers::new(NAME, &[]).extract(&h),
            key("pr-1")
        );
    }

    #[test]
    fn the_cookie_set_for_a_browser_session() {
        let value = set_cookie(NAME, "pr-1", Duration::from_secs(3600)).unwrap();
        let text = value.to_str().unwrap();
        let mut attrs: Vec<&str> = text.split("; ").collect();
        assert_eq!(attrs.remove(0), "sd-routing-key=pr-1");
        attrs.sort_unstable();
        assert_eq!(
            attrs,
            ["HttpOnly", "Max-Age=3600", "Path=/", "SameSite=Lax"]
        );
        // What the router reads back from a browser.
        let back = headers(&[("cookie", "sd-routing-key=pr-1")]);
        assert_eq!(from_cookies(&back, NAME), key("pr-1"));
    }
}
