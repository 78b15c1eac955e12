//! How long the kernel may trust what a file system told it, per mount.
//!
//! The kernel's caches (dentries, attributes, page cache, readdir results)
//! answer requests without waking the daemon; a cache is only allowed when the
//! file system can keep it exact. Every mode has a named invalidation rule:
//!
//! - `Exact` (`--cache auto` when every change is seen, `--cache always`):
//!   long TTLs, kept right by notifications (FUSE_NOTIFY_INVAL_ENTRY /
//!   INVAL_INODE) for changes that do not pass through the mount. Changes that
//!   pass through the mount update the kernel's caches as they happen.
//! - `Short` (`--profile plain`, or `--cache auto` when the backing store
//!   cannot be watched): 1 s TTLs, as libfuse's defaults, and page cache
//!   dropped on each open.
//! - `None` (`--cache none`): TTL 0, every lookup and stat asks the daemon.

use std::time::Duration;

/// What `--cache` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// Long TTLs when the file system can keep them exact, short otherwise.
    #[default]
    Auto,
    /// No kernel caching of names and attributes.
    None,
    /// Long TTLs, no watching: the user promises nothing changes behind the mount.
    Always,
}

impl std::str::FromStr for CacheMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(CacheMode::Auto),
            "none" => Ok(CacheMode::None),
            "always" => Ok(CacheMode::Always),
            _ => Err(format!("unknown cache mode '{s}' (auto, none, always)")),
        }
    }
}

/// TTLs and page-cache rules a file system applies to its replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CachePolicy {
    /// How long a name -> node mapping may be cached.
    pub entry_ttl: Duration,
    /// How long attributes may be cached.
    pub attr_ttl: Duration,
    /// How long "no such name" may be cached (0: negative entries are not cached).
    pub negative_ttl: Duration,
    /// Opens keep the page cache (FOPEN_KEEP_CACHE): data changes are notified.
    pub keep_cache: bool,
    /// Directory listings may be cached (FOPEN_CACHE_DIR): changes are notified.
    pub cache_dir: bool,
}

/// A day: "forever" for a cache that is kept exact, short enough that a
/// missed notification cannot last.
pub const LONG_TTL: Duration = Duration::from_secs(86_400);

impl CachePolicy {
    /// Long-lived caches kept exact by notifications.
    pub const EXACT: CachePolicy = CachePolicy {
        entry_ttl: LONG_TTL,
        attr_ttl: LONG_TTL,
        negative_ttl: LONG_TTL,
        keep_cache: true,
        cache_dir: true,
    };

    /// libfuse's defaults: 1 s, no negative entries, page cache dropped at open.
    pub const SHORT: CachePolicy = CachePolicy {
        entry_ttl: Duration::from_secs(1),
        attr_ttl: Duration::from_secs(1),
        negative_ttl: Duration::ZERO,
        keep_cache: false,
        cache_dir: false,
    };

    /// Nothing cached.
    pub const NONE: CachePolicy = CachePolicy {
        entry_ttl: Duration::ZERO,
        attr_ttl: Duration::ZERO,
        negative_ttl: Duration::ZERO,
        keep_cache: false,
        cache_dir: false,
    };
}
