use std::time::Duration;

/// A point on the driver's monotonic clock, in nanoseconds since an origin the driver picks.
///
/// The core never reads a clock: every call that needs time takes a `Timestamp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(u64);

impl Timestamp {
    pub const ZERO: Timestamp = Timestamp(0);

    /// The timestamp `since_origin` after the origin; saturates after 584 years.
    pub fn from_duration(since_origin: Duration) -> Self {
        Timestamp(u64::try_from(since_origin.as_nanos()).unwrap_or(u64::MAX))
    }

    pub fn as_nanos(self) -> u64 {
        self.0
    }

    /// Time from `earlier` to `self`, zero if `earlier` is later.
    pub fn saturating_since(self, earlier: Timestamp) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }

    pub fn saturating_add(self, d: Duration) -> Timestamp {
        Timestamp(self.0.saturating_add(nanos(d)))
    }

    /// The timestamp `d` before `self`, or the origin if that is earlier.
    pub fn saturating_sub(self, d: Duration) -> Timestamp {
        Timestamp(self.0.saturating_sub(nanos(d)))
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}
