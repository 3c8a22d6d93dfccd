//! Chat threads: the message a chat sink started a run's thread with, so that every replica
//! (and a restarted daemon) posts the run's later messages in that thread.

use super::{Store, StoreError};

impl Store {
    /// The thread `sink` keeps run `run_id`'s messages in, if it started one.
    pub async fn chat_thread(&self, sink: &str, run_id: i64) -> Result<Option<String>, StoreError> {
        let sink = sink.to_string();
        self.read(move |c| {
            c.row(
                "SELECT thread FROM chat_threads WHERE sink = ?1 AND run_id = ?2",
                &[&sink, &run_id],
                |r| r.get(0),
            )
        })
        .await
    }

    /// Records the thread `sink` started for run `run_id`. When another replica recorded one
    /// first, that one stays; returns the thread in force.
    pub async fn set_chat_thread(
        &self,
        sink: &str,
        run_id: i64,
        thread: &str,
    ) -> Result<String, StoreError> {
        let (sink, thread) = (sink.to_string(), thread.to_string());
        self.write(move |c| {
            c.exec(
                "INSERT INTO chat_threads (sink, run_id, thread) VALUES (?1, ?2, ?3)
                 ON CONFLICT (sink, run_id) DO NOTHING",
                &[&sink, &run_id, &thread],
            )?;
            c.one(
                "SELECT thread FROM chat_threads WHERE sink = ?1 AND run_id = ?2",
                &[&sink, &run_id],
                |r| r.get(0),
            )
        })
        .await
    }
}
