//! API keys as the server holds them: SHA-256 digests of `--api-key` and
//! the lines of `--api-key-file`, checked in time independent of their
//! contents (the `api::auth` middleware asks it).
//!
//! A presented key is hashed and compared against every configured digest
//! with a branch-free fold, so the time taken says nothing about how much
//! of a key was right, nor which key matched. (Hashing first also makes the
//! comparison fixed-length; the `sha2` crate is already here for cache
//! keys.)

use std::path::Path;

use sha2::{Digest, Sha256};

/// The accepted keys, as digests.
#[derive(Clone)]
pub struct ApiKeys {
    digests: Vec<[u8; 32]>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} keys)", self.digests.len())
    }
}

impl ApiKeys {
    /// `None` when no key is given: the server is open.
    pub fn new<I, S>(keys: I) -> Option<ApiKeys>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let digests: Vec<[u8; 32]> = keys
            .into_iter()
            .map(|k| k.as_ref().trim().to_string())
            .filter(|k| !k.is_empty())
            .map(|k| digest(k.as_bytes()))
            .collect();
        (!digests.is_empty()).then_some(ApiKeys { digests })
    }

    /// The keys from `--api-key` and the lines of `--api-key-file`
    /// (blank lines and `#` comments skipped).
    pub fn load(key: Option<&str>, file: Option<&Path>) -> Result<Option<ApiKeys>, String> {
        let mut keys: Vec<String> = key.map(str::to_string).into_iter().collect();
        if let Some(file) = file {
            let text = std::fs::read_to_string(file)
                .map_err(|e| format!("cannot read the API key file {}: {e}", file.display()))?;
            let from_file: Vec<String> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_string)
                .collect();
            if from_file.is_empty() {
                return Err(format!("the API key file {} holds no key", file.display()));
            }
            keys.extend(from_file);
        }
        if key.is_some_and(|k| k.trim().is_empty()) {
            return Err("--api-key is empty".into());
        }
        Ok(ApiKeys::new(keys))
    }

    /// Whether `presented` is one of the keys, in time independent of the
    /// keys' contents.
    pub fn accepts(&self, presented: &[u8]) -> bool {
        let d = digest(presented);
        let mut matched = 0u8;
        for k in &self.digests {
            let mut diff = 0u8;
            for (a, b) in d.iter().zip(k) {
                diff |= a ^ b;
            }
            // 1 when diff is 0, else 0, without a branch.
            matched |= (((diff as u16).wrapping_sub(1) >> 8) & 1) as u8;
        }
        std::hint::black_box(matched) == 1
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_only_configured_keys() {
        let keys = ApiKeys::new(["sk-one", " sk-two "]).unwrap();
        assert!(keys.accepts(b"sk-one"));
        assert!(keys.accepts(b"sk-two"));
        for wrong in [&b""[..], b"sk-on", b"sk-one ", b"SK-ONE", b"sk-onex"] {
            assert!(!keys.accepts(wrong), "{wrong:?}");
        }
        assert!(ApiKeys::new(Vec::<String>::new()).is_none());
        assert!(ApiKeys::new([" "]).is_none());
    }

    #[test]
    fn loads_a_key_file() {
        let path =
            std::env::temp_dir().join(format!("hearth-keys-{}", uuid::Uuid::new_v4().simple()));
        std::fs::write(&path, "# rotated monthly\nsk-file\n\n").unwrap();
        let keys = ApiKeys::load(Some("sk-flag"), Some(&path))
            .unwrap()
            .unwrap();
        assert!(keys.accepts(b"sk-file") && keys.accepts(b"sk-flag"));
        std::fs::write(&path, "# nothing\n").unwrap();
        assert!(ApiKeys::load(None, Some(&path)).is_err());
        let _ = std::fs::remove_file(&path);
        assert!(ApiKeys::load(None, None).unwrap().is_none());
    }
}
