//! The request id: one per request to the inference or management API, taken from the
//! client's `X-Request-Id` when it is a sane one and made up otherwise, echoed in the
//! response's `X-Request-Id`, and named in every log line about that request (the HTTP
//! middleware runs the request inside a `request{id=...}` span; a worker names the ids
//! of the batch it ran).
//!
//! Pure: what an acceptable id is and how new ones are made. The middleware that applies
//! it is `http::edge`.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// The header that carries it, both ways.
pub const HEADER: &str = "x-request-id";

/// The longest id taken from a client; a longer one is replaced.
pub const MAX_LEN: usize = 128;

/// A request's id (cheap to clone).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RequestId(Arc<str>);

tokio::task_local! {
    static CURRENT: RequestId;
}

impl RequestId {
    /// The client's id if it is 1 to [`MAX_LEN`] visible ASCII characters (what can sit
    /// in a log line and a header unescaped), else a new one.
    pub fn from_client(header: Option<&[u8]>) -> RequestId {
        match header {
            Some(id) if Self::acceptable(id) => {
                RequestId(String::from_utf8_lossy(id).into_owned().into())
            }
            _ => RequestId::new(),
        }
    }

    /// Whether a client's id is kept as it is.
    pub fn acceptable(id: &[u8]) -> bool {
        (1..=MAX_LEN).contains(&id.len()) && id.iter().all(|b| b.is_ascii_graphic())
    }

    /// A new id: 32 hex digits, a per-process random half and a counter, so ids never
    /// repeat within a process and almost surely not across processes.
    pub fn new() -> RequestId {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        static PROCESS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
        let process = *PROCESS.get_or_init(|| {
            use std::hash::{BuildHasher, Hasher};
            // RandomState is seeded from the OS's randomness.
            let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
            hasher.write_u128(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos()),
            );
            hasher.write_u32(std::process::id());
            hasher.finish()
        });
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        RequestId(format!("{process:016x}{n:016x}").into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Runs `future` as the request `self` (what [`RequestId::current`] answers inside).
    pub async fn scope<F: Future>(self, future: F) -> F::Output {
        CURRENT.scope(self, future).await
    }

    /// The id of the request the calling task serves, if any.
    pub fn current() -> Option<RequestId> {
        CURRENT.try_with(Clone::clone).ok()
    }
}

impl Default for RequestId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Ids joined by commas, for a log line about several requests.
pub fn joined<'a>(ids: impl IntoIterator<Item = Option<&'a RequestId>>) -> String {
    let ids: Vec<&str> = ids.into_iter().flatten().map(RequestId::as_str).collect();
    ids.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sane_client_id_is_kept_and_others_are_replaced() {
        let kept = RequestId::from_client(Some(b"trace-42/abc:1"));
        assert_eq!(kept.as_str(), "trace-42/abc:1");
        for bad in [
            &b""[..],
            b"has space",
            b"tab\there",
            b"caf\xc3\xa9",
            b"line\nbreak",
            &[b'x'; MAX_LEN + 1],
        ] {
            let id = RequestId::from_client(Some(bad));
            assert_ne!(id.as_str().as_bytes(), bad);
            assert_eq!(id.as_str().len(), 32, "a new id instead of {bad:?}");
        }
        assert!(RequestId::acceptable(&[b'x'; MAX_LEN]));
        assert_eq!(RequestId::from_client(None).as_str().len(), 32);
    }

    #[test]
    fn new_ids_are_hex_and_never_repeat() {
        let ids: std::collections::HashSet<String> =
            (0..10_000).map(|_| RequestId::new().to_string()).collect();
        assert_eq!(ids.len(), 10_000);
        assert!(
            ids.iter()
                .all(|id| id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()))
        );
    }

    #[tokio::test]
    async fn the_current_id_is_the_scopes() {
        assert_eq!(RequestId::current(), None);
        let id = RequestId::from_client(Some(b"abc"));
        let inside = id.clone().scope(async { RequestId::current() }).await;
        assert_eq!(inside, Some(id));
        assert_eq!(RequestId::current(), None);
    }

    #[test]
    fn joined_skips_requests_without_an_id() {
        let (a, b) = (
            RequestId::from_client(Some(b"a")),
            RequestId::from_client(Some(b"b")),
        );
        assert_eq!(joined([Some(&a), None, Some(&b)]), "a,b");
        assert_eq!(joined([None]), "");
    }
}
