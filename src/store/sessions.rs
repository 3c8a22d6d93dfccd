//! Console sessions: a random cookie whose SHA-256 digest is the key, the token name it logged
//! in as, its CSRF token and its expiry. The cookie itself is never stored.

use super::{Store, StoreError};

/// A live console session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// The token name it logged in with (`anonymous` when auth is off).
    pub name: String,
    /// Which token that was ([`crate::api::auth::Auth::binding`]).
    pub token: [u8; 32],
    /// The token every form of this session carries.
    pub csrf: String,
    /// When it ends (ms since the epoch).
    pub expires_at: i64,
}

impl Store {
    /// Records a new session under the digest of its cookie; audited as a login. Ended
    /// sessions are swept in the same write.
    pub async fn create_session(
        &self,
        id_hash: [u8; 32],
        session: Session,
    ) -> Result<(), StoreError> {
        let now = self.now_ms();
        self.write(move |c| {
            c.exec("DELETE FROM sessions WHERE expires_at <= ?1", &[&now])?;
            c.exec(
                "INSERT INTO sessions (id_hash, name, token, csrf, created_at, expires_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                &[&&id_hash[..], &session.name, &&session.token[..], &session.csrf, &now, &session.expires_at],
            )?;
            super::audit::audit_in(c, &session.name, "console login", None, "ok", None)?;
            Ok(())
        })
        .await
    }

    /// The live session with this cookie digest, if any.
    pub async fn session(&self, id_hash: [u8; 32]) -> Result<Option<Session>, StoreError> {
        let now = self.now_ms();
        self.read(move |c| {
            c.row(
                "SELECT name, token, csrf, expires_at FROM sessions WHERE id_hash = ?1 AND expires_at > ?2",
                &[&&id_hash[..], &now],
                |r| {
                    let token: Vec<u8> = r.get(1)?;
                    Ok(Session {
                        name: r.get(0)?,
                        token: token.try_into().map_err(|_| StoreError::NoRow)?,
                        csrf: r.get(2)?,
                        expires_at: r.get(3)?,
                    })
                },
            )
        })
        .await
    }

    /// Ends a session (logout); audited.
    pub async fn end_session(&self, id_hash: [u8; 32], name: String) -> Result<(), StoreError> {
        self.write(move |c| {
            c.exec("DELETE FROM sessions WHERE id_hash = ?1", &[&&id_hash[..]])?;
            super::audit::audit_in(c, &name, "console logout", None, "ok", None)?;
            Ok(())
        })
        .await
    }
}
