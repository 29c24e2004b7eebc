//! Sandbox routing keys: what a valid key looks like.
//!
//! Keys travel in request headers and name sandboxes in the config, the API and the CLI; the
//! same rule applies everywhere: 1 to 63 characters of `[A-Za-z0-9._-]`.

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

#[cfg(test)]
mod tests {
    use super::*;

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
