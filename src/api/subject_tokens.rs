//! Subject tokens: read-only bearer tokens for one subject that expire, for
//! showing end users their own usage (`POST /v1/subjects/{s}/tokens`). A
//! token names its subject and expiry and is signed with HMAC-SHA256, so
//! nothing is stored per token: checking one is a hash, and it holds on
//! every node that has the key. The key is made once per data directory
//! (`subject-tokens.key`), derived from the shared secret in a cluster, or
//! made afresh in memory when nothing is kept. Replacing the key revokes
//! every token at once.

use std::path::Path;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path as UrlPath, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::{body_bytes, parse, subject_path, ApiError, AppState};
use crate::config::Role;
use crate::period::{rfc3339, Period};

type HmacSha256 = Hmac<Sha256>;

/// What every subject token begins with.
pub const PREFIX: &str = "qst_";
/// The key file in the data directory.
pub const KEY_FILE: &str = "subject-tokens.key";
const MIN_TTL_MS: u64 = 60_000;
const MAX_TTL_MS: u64 = 30 * 86_400_000;

/// The key tokens are signed with.
#[derive(Clone)]
pub struct SubjectKey([u8; 32]);

impl std::fmt::Debug for SubjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SubjectKey(..)")
    }
}

impl SubjectKey {
    /// A key derived from a cluster's shared secret: the same on every node.
    pub fn from_secret(secret: &[u8]) -> SubjectKey {
        let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
        mac.update(b"quotad subject tokens v1");
        SubjectKey(mac.finalize().into_bytes().into())
    }

    /// A new random key, kept nowhere.
    pub fn random() -> std::io::Result<SubjectKey> {
        let mut k = [0u8; 32];
        getrandom::fill(&mut k).map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(SubjectKey(k))
    }

    /// The key in `dir`'s key file, made (readable by the owner only) when
    /// there is none yet.
    pub fn in_dir(dir: &Path) -> std::io::Result<SubjectKey> {
        let path = dir.join(KEY_FILE);
        let bad = |what: &str| {
            std::io::Error::other(format!(
                "{} {what}; delete it to make a new key (this revokes every subject token)",
                path.display()
            ))
        };
        match std::fs::read(&path) {
            Ok(text) => {
                let bytes = hex::decode(text.trim_ascii()).map_err(|_| bad("is not a hex key"))?;
                let k: [u8; 32] = bytes.try_into().map_err(|_| bad("does not hold 32 bytes"))?;
                Ok(SubjectKey(k))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt;
                std::fs::create_dir_all(dir)?;
                let key = SubjectKey::random()?;
                // A temporary file of this process's own, linked into place
                // only if no key is there yet: two daemons (or tests) making
                // the key at once end with one key, the first one linked.
                let tmp = dir.join(format!(
                    "{KEY_FILE}.{}.{}.tmp",
                    std::process::id(),
                    hex::encode(&SubjectKey::random()?.0[..8])
                ));
                let written = (|| {
                    let mut f = std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(&tmp)?;
                    f.write_all(hex::encode(key.0).as_bytes())?;
                    f.sync_all()?;
                    std::fs::hard_link(&tmp, &path)
                })();
                let _ = std::fs::remove_file(&tmp);
                match written {
                    Ok(()) => {
                        std::fs::File::open(dir)?.sync_all()?;
                        Ok(key)
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => SubjectKey::in_dir(dir),
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(std::io::Error::new(
                e.kind(),
                format!("cannot read {}: {e}", path.display()),
            )),
        }
    }

    fn mac(&self, subject: &str, expires_ms: u64) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(&(subject.len() as u64).to_le_bytes());
        mac.update(subject.as_bytes());
        mac.update(&expires_ms.to_le_bytes());
        mac
    }

    /// A token for `subject` that expires at `expires_ms`.
    pub fn mint(&self, subject: &str, expires_ms: u64) -> String {
        let tag = self.mac(subject, expires_ms).finalize().into_bytes();
        format!("{PREFIX}{}.{expires_ms}.{}", hex::encode(subject), hex::encode(tag))
    }

    /// The subject a token is for, if it is one of ours and has not expired.
    /// Errors say what is wrong in words a caller can act on.
    pub fn verify(&self, token: &str, now_ms: u64) -> Result<String, &'static str> {
        let rest = token.strip_prefix(PREFIX).ok_or("not a subject token")?;
        let mut parts = rest.splitn(3, '.');
        let (Some(subject), Some(expires), Some(tag)) = (parts.next(), parts.next(), parts.next()) else {
            return Err("the subject token is malformed");
        };
        let subject = hex::decode(subject)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or("the subject token is malformed")?;
        let expires_ms: u64 = expires.parse().map_err(|_| "the subject token is malformed")?;
        let tag = hex::decode(tag).map_err(|_| "the subject token is malformed")?;
        // Constant time: the comparison tells nothing about how close a guess was.
        self.mac(&subject, expires_ms)
            .verify_slice(&tag)
            .map_err(|_| "the subject token is not valid (wrong signature, or the key was replaced)")?;
        if now_ms >= expires_ms {
            return Err("the subject token has expired");
        }
        Ok(subject)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MintBody {
    #[serde(default)]
    ttl: Option<String>,
}

#[derive(Serialize)]
struct Minted {
    token: String,
    subject: String,
    expires_at: String,
}

/// `POST /v1/subjects/{subject}/tokens` (admin): a read-only token for that
/// subject alone. `ttl`: 1m to 30d, default 1h.
pub(super) async fn mint(
    State(st): State<Arc<AppState>>,
    UrlPath(subject): UrlPath<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    st.authorize(&headers, Role::Admin)?;
    subject_path(&subject)?;
    let b: MintBody = parse(&body_bytes(body, st.max_body_bytes)?)?;
    let ttl = b.ttl.as_deref().unwrap_or("1h");
    let bad = || {
        ApiError::invalid(
            "ttl",
            format!("{ttl:?} is not a duration from 1m to 30d, such as \"15m\", \"1h\" or \"7d\""),
        )
    };
    let ms = Period::parse_duration(ttl)
        .ok()
        .and_then(|p| p.fixed_ms())
        .filter(|ms| (MIN_TTL_MS..=MAX_TTL_MS).contains(ms))
        .ok_or_else(bad)?;
    let expires_ms = st.now() + ms;
    Ok(Json(Minted {
        token: st.subject_key.mint(&subject, expires_ms),
        subject,
        expires_at: rfc3339(expires_ms),
    })
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Servers starting at once on one directory end with one key (a test
    /// failed in CI when two renamed the same temporary file).
    #[test]
    fn keys_made_at_once_in_one_directory_are_one_key() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        let keys: Vec<[u8; 32]> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| SubjectKey::in_dir(&dir).unwrap().0))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(keys.iter().all(|k| *k == keys[0]), "one key");
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, [KEY_FILE], "no temporary file is left");
        assert_eq!(SubjectKey::in_dir(&dir).unwrap().0, keys[0], "read back");
    }

    #[test]
    fn a_token_holds_for_its_subject_until_it_expires() {
        let k = SubjectKey::random().unwrap();
        let t = k.mint("user:42 ü/x", 1_000);
        assert!(t.starts_with(PREFIX));
        assert_eq!(k.verify(&t, 999).unwrap(), "user:42 ü/x");
        assert_eq!(k.verify(&t, 1_000), Err("the subject token has expired"));
        // Another key, a changed subject or expiry, or a cut tag fail.
        assert!(SubjectKey::random().unwrap().verify(&t, 0).is_err());
        let other = k.mint("user:43", 1_000);
        let (head, tag) = t.rsplit_once('.').unwrap();
        let (_, other_tag) = other.rsplit_once('.').unwrap();
        assert!(k.verify(&format!("{head}.{other_tag}"), 0).is_err());
        assert!(k.verify(&t.replace(".1000.", ".9999."), 0).is_err());
        assert!(k.verify(&format!("{head}.{}", &tag[..10]), 0).is_err());
        assert!(k.verify("qst_zz.1.2", 0).is_err());
        assert!(k.verify("admin-token", 0).is_err());
    }

    #[test]
    fn the_key_file_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let a = SubjectKey::in_dir(dir.path()).unwrap();
        let b = SubjectKey::in_dir(dir.path()).unwrap();
        assert_eq!(a.0, b.0);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(dir.path().join(KEY_FILE), "nonsense").unwrap();
        let e = SubjectKey::in_dir(dir.path()).unwrap_err().to_string();
        assert!(e.contains("is not a hex key") && e.contains("delete it"), "{e}");
        // Every node of a cluster derives the same key from the secret.
        assert_eq!(SubjectKey::from_secret(b"s").0, SubjectKey::from_secret(b"s").0);
        assert_ne!(SubjectKey::from_secret(b"s").0, SubjectKey::from_secret(b"t").0);
    }
}
