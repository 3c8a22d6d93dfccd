//! Live run pages (server-sent events) hold a connection for as long as they are open, so
//! they are bounded apart from requests: at most [`MAX_PER_SESSION`] per console session and
//! a quarter of `server.max_connections` in all, so that they can never take the connection
//! slots that webhooks need. A stream also ends when its session does (logout, expiry).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Live pages one session may have open at once (a few tabs).
pub const MAX_PER_SESSION: usize = 4;

/// Open live streams, in all and per session.
#[derive(Debug)]
pub struct Streams {
    total: Arc<Semaphore>,
    max_total: usize,
    per_session: Mutex<HashMap<[u8; 32], usize>>,
}

/// A stream's place; given back when the stream ends.
#[derive(Debug)]
pub struct StreamSlot {
    _total: OwnedSemaphorePermit,
    session: [u8; 32],
    streams: Arc<Streams>,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut per = (self.streams.per_session.lock()).unwrap_or_else(|p| p.into_inner());
        if let Some(n) = per.get_mut(&self.session) {
            *n -= 1;
            if *n == 0 {
                per.remove(&self.session);
            }
        }
    }
}

impl Streams {
    /// For a server taking `max_connections` at once.
    pub fn new(max_connections: usize) -> Streams {
        let max_total = (max_connections / 4).max(1);
        Streams {
            total: Arc::new(Semaphore::new(max_total)),
            max_total,
            per_session: Mutex::new(HashMap::new()),
        }
    }

    /// A place for one more stream of `session`, or why there is none.
    pub fn open(self: &Arc<Self>, session: [u8; 32]) -> Result<StreamSlot, String> {
        let mut per = self.per_session.lock().unwrap_or_else(|p| p.into_inner());
        let mine = per.get(&session).copied().unwrap_or(0);
        if mine >= MAX_PER_SESSION {
            return Err(format!(
                "this session has {mine} live pages open already (at most {MAX_PER_SESSION}); \
                 close one, or reload without live updates"
            ));
        }
        let permit = self.total.clone().try_acquire_owned().map_err(|_| {
            format!(
                "{} live pages are open, the most Reflex keeps beside its webhooks; try again later",
                self.max_total
            )
        })?;
        *per.entry(session).or_default() += 1;
        Ok(StreamSlot {
            _total: permit,
            session,
            streams: self.clone(),
        })
    }
}

impl Default for Streams {
    fn default() -> Self {
        Streams::new(crate::api::server::ServerConfig::default().max_connections)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_capped_per_session_and_in_all_and_given_back() {
        let s = Arc::new(Streams::new(8));
        let (a, b) = ([1; 32], [2; 32]);
        let first = s.open(a).unwrap();
        let second = s.open(b).unwrap();
        assert!(
            s.open(a).unwrap_err().contains("live pages are open"),
            "2 of 8/4 in all"
        );
        drop(second);
        let again = s.open(a).unwrap();
        drop((first, again));
        let many = Arc::new(Streams::new(1000));
        let held: Vec<_> = (0..MAX_PER_SESSION)
            .map(|_| many.open(a).unwrap())
            .collect();
        assert!(many.open(a).unwrap_err().contains("this session"));
        assert!(many.open(b).is_ok(), "another session is not held");
        drop(held);
        assert!(many.open(a).is_ok());
    }
}
