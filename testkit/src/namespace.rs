//! Per-test namespaces, so tests sharing one server never see each other's
//! keys and queues, and clean-up that runs when the test ends.

use std::fmt;
#[cfg(feature = "redis")]
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
#[cfg(feature = "redis")]
use std::time::Duration;

use parking_lot::Mutex;

/// Numbers namespaces made by this process.
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// The longest part of a test name kept in a prefix.
const MAX_NAME_LEN: usize = 40;

/// How long one step of [`redis_cleanup`] may block.
#[cfg(feature = "redis")]
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(3);

type CleanupFn = Box<dyn FnOnce() + Send + 'static>;

/// A unique name prefix for one test, with clean-up actions that run when it
/// is dropped.
///
/// The prefix looks like `keel-t-<name>-<pid>-<counter>-<random>`: the
/// sanitized test name (ASCII letters, digits, `_` and `-`, at most 40
/// characters) so leftovers can be traced to their test, then the process id,
/// a per-process counter and 8 random hex digits, so concurrent tests and
/// concurrent test binaries never collide. It contains no `{`, `}`, `:` or
/// glob characters, so it is safe inside a Redis hash tag, a key pattern or a
/// RabbitMQ queue name.
///
/// Clean-up actions run in reverse order of registration when the namespace
/// is dropped, including when the test panics. They run synchronously inside
/// `Drop`, so they must not need the async runtime.
///
/// # Example
///
/// ```no_run
/// use keel_testkit::Namespace;
///
/// let ns = Namespace::new("lease_expiry").with_redis_cleanup("redis://127.0.0.1:6379");
/// let stream = ns.name("jobs"); // keel-t-lease_expiry-<pid>-<n>-<hex>-jobs
/// let key = format!("{{{}}}:ready", ns.prefix()); // hash-tagged keys are cleaned up too
/// // ... when `ns` drops, every key containing the prefix is deleted ...
/// ```
pub struct Namespace {
    prefix: String,
    /// Locked only to push or pop, never across a call into a clean-up.
    cleanups: Mutex<Vec<CleanupFn>>,
}

impl fmt::Debug for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Namespace")
            .field("prefix", &self.prefix)
            .field("cleanups", &self.cleanups.lock().len())
            .finish()
    }
}

impl Namespace {
    /// A fresh namespace for the test called `test_name`.
    #[must_use]
    pub fn new(test_name: &str) -> Self {
        let mut name: String = test_name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                    c
                } else {
                    '-'
                }
            })
            .take(MAX_NAME_LEN)
            .collect();
        if name.is_empty() {
            name.push_str("test");
        }
        let counter = COUNTER.fetch_add(1, Ordering::Relaxed);
        let random: u32 = rand::random();
        Self {
            prefix: format!(
                "keel-t-{name}-{pid}-{counter}-{random:08x}",
                pid = std::process::id()
            ),
            cleanups: Mutex::new(Vec::new()),
        }
    }

    /// The unique prefix; put it in (or at the start of) every key, queue
    /// and exchange name the test creates.
    #[must_use]
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `"<prefix>-<suffix>"`: a name inside this namespace.
    #[must_use]
    pub fn name(&self, suffix: &str) -> String {
        format!("{}-{suffix}", self.prefix)
    }

    /// Registers `cleanup` to run when the namespace is dropped.
    ///
    /// A panic inside `cleanup` is caught and logged, so one failed clean-up
    /// neither skips the others nor aborts a test that is already panicking.
    pub fn on_drop(&self, cleanup: impl FnOnce() + Send + 'static) -> &Self {
        self.cleanups.lock().push(Box::new(cleanup));
        self
    }

    /// Registers [`redis_cleanup`] of this prefix on the Redis at `url`, to
    /// run when the namespace is dropped. A failed clean-up is logged, not
    /// raised.
    #[cfg(feature = "redis")]
    #[must_use]
    pub fn with_redis_cleanup(self, url: impl Into<String>) -> Self {
        let url = url.into();
        let prefix = self.prefix.clone();
        self.on_drop(move || match redis_cleanup(&url, &prefix) {
            Ok(deleted) => tracing::debug!(%prefix, deleted, "namespace cleaned up"),
            Err(error) => tracing::warn!(%prefix, %error, "namespace clean-up failed"),
        });
        self
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        while let Some(cleanup) = self.cleanups.get_mut().pop() {
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(cleanup)).is_err() {
                tracing::warn!(prefix = %self.prefix, "a namespace clean-up panicked");
            }
        }
    }
}

/// Deletes every key on the Redis at `url` whose name contains `prefix`
/// (pattern `*<prefix>*`, so hash-tagged keys like `{<prefix>}:ready` are
/// included) and returns how many were deleted.
///
/// It uses `SCAN` and `DEL` over a blocking connection, so it can run inside
/// `Drop`; each step is bounded by a 3 second timeout. Glob characters in
/// `prefix` are escaped, so they match literally.
///
/// # Errors
///
/// Fails if the URL is invalid, the server cannot be reached, or a command
/// fails.
#[cfg(feature = "redis")]
pub fn redis_cleanup(url: &str, prefix: &str) -> io::Result<usize> {
    let fail = |error: redis::RedisError| {
        io::Error::other(format!(
            "cleaning up keys matching `*{prefix}*` on {url} failed: {error}"
        ))
    };
    let client = redis::Client::open(url).map_err(fail)?;
    let mut connection = client
        .get_connection_with_timeout(CLEANUP_TIMEOUT)
        .map_err(fail)?;
    connection
        .set_read_timeout(Some(CLEANUP_TIMEOUT))
        .map_err(fail)?;
    connection
        .set_write_timeout(Some(CLEANUP_TIMEOUT))
        .map_err(fail)?;
    let pattern = format!("*{}*", escape_glob(prefix));
    let mut cursor: u64 = 0;
    let mut deleted = 0;
    loop {
        let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query(&mut connection)
            .map_err(fail)?;
        if !keys.is_empty() {
            let n: usize = redis::cmd("DEL")
                .arg(&keys)
                .query(&mut connection)
                .map_err(fail)?;
            deleted += n;
        }
        if next == 0 {
            return Ok(deleted);
        }
        cursor = next;
    }
}

/// Escapes the characters Redis glob patterns treat specially.
#[cfg(feature = "redis")]
fn escape_glob(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_is_sanitized_and_unique() {
        let a = Namespace::new("queue::lease {expiry}*");
        let b = Namespace::new("queue::lease {expiry}*");
        assert_ne!(a.prefix(), b.prefix());
        assert!(a.prefix().starts_with("keel-t-queue--lease--expiry---"));
        assert!(
            a.prefix()
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        );
        assert_eq!(a.name("jobs"), format!("{}-jobs", a.prefix()));
    }

    #[test]
    fn long_and_empty_names() {
        let long = Namespace::new(&"x".repeat(500));
        assert!(long.prefix().len() < 100);
        assert!(Namespace::new("").prefix().starts_with("keel-t-test-"));
    }

    #[test]
    fn cleanups_run_in_reverse_once() {
        let log = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
        {
            let ns = Namespace::new("order");
            let first = log.clone();
            let second = log.clone();
            ns.on_drop(move || first.lock().push(1))
                .on_drop(|| panic!("a failing clean-up"))
                .on_drop(move || second.lock().push(2));
        }
        assert_eq!(*log.lock(), vec![2, 1]);
    }

    #[cfg(feature = "redis")]
    #[test]
    fn escapes_glob_characters() {
        assert_eq!(escape_glob(r"a*b?c[d]e\f"), r"a\*b\?c\[d\]e\\f");
    }
}
