//! The time the token cache reads. In production it is the system's; a unit test gives a
//! provider one that follows tokio's paused clock, so that a refresher's expiry, backoff and
//! `Retry-After` can be stepped through in virtual time (tokio's `Instant`, which the
//! refresher's deadlines use, is the std one outside such a test).

use time::OffsetDateTime;
use tokio::time::Instant;

#[derive(Debug, Clone, Copy, Default)]
pub struct Clock {
    /// Wall time at a tokio instant: the wall clock then moves with tokio's (test clocks only).
    anchor: Option<(OffsetDateTime, Instant)>,
}

impl Clock {
    pub const SYSTEM: Clock = Clock { anchor: None };

    /// A wall clock that reads `start` now and then advances with tokio's clock.
    #[cfg(test)]
    pub fn following_tokio(start: OffsetDateTime) -> Clock {
        Clock { anchor: Some((start, Instant::now())) }
    }

    pub fn now(&self) -> OffsetDateTime {
        match self.anchor {
            None => OffsetDateTime::now_utc(),
            Some((wall, at)) => wall + at.elapsed(),
        }
    }
}
