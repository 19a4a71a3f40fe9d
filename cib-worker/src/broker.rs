//! The broker's side of things, on RabbitMQ through `lapin`: connecting, declaring the
//! topology both the server and the workers rely on, and publishing with confirms.
//!
//! Topology: one quorum queue per label set (`cib.jobs.os=macos`), durable, with a delivery
//! limit of `max_tries - 1` (`[broker] max_tries`, [`DEFAULT_MAX_TRIES`](crate::protocol::DEFAULT_MAX_TRIES)
//! by default) and dead-lettering (at least once) to the fanout exchange `cib.dead`, whose
//! quorum queue `cib.dead` the server reads.
//!
//! Only the server declares job queues with their arguments, since only it knows
//! `max_tries`; a worker declares them passively (which asserts no argument) and waits for a
//! queue the server has not made yet. A quorum queue's arguments cannot change once declared:
//! when `max_tries` changed, the server replaces a queue of the old limit that holds no job,
//! and refuses one that still does: the step fails with [`DeclareError::Inequivalent`]'s
//! reason, which names the queue and what to do, rather than run with another limit than the
//! one asked.

use lapin::options::{
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

use crate::protocol::{DEAD_LETTER_EXCHANGE, DEAD_LETTER_QUEUE};

/// Connects to the broker. `heartbeat` (seconds) is asked for in the URL unless it names one,
/// so that a connection to a host that died is noticed within two beats and its unacknowledged
/// jobs go back to their queue.
pub async fn connect(url: &str, heartbeat_secs: u16, name: &str) -> Result<Connection, String> {
    let url = if url.contains("heartbeat=") {
        url.to_owned()
    } else if url.contains('?') {
        format!("{url}&heartbeat={heartbeat_secs}")
    } else {
        format!("{url}?heartbeat={heartbeat_secs}")
    };
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    Connection::connect(&url, properties)
        .await
        .map_err(|e| format!("cannot connect to the broker {}: {e}", redact(&url)))
}

/// The URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

fn quorum_arguments() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString(LongString::from("quorum")));
    args
}

/// The arguments of every job queue: `max_tries` tries are the first delivery and
/// `max_tries - 1` redeliveries, after which the broker dead-letters the job.
fn job_queue_arguments(max_tries: u32) -> FieldTable {
    let mut args = quorum_arguments();
    let redeliveries = i64::from(max_tries.max(1) - 1);
    args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(redeliveries));
    args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(LongString::from(DEAD_LETTER_EXCHANGE)));
    // At-least-once dead-lettering keeps a job until the dead-letter queue confirmed it, so a
    // broker restart at that moment loses no job; RabbitMQ requires `reject-publish` for it.
    args.insert("x-dead-letter-strategy".into(), AMQPValue::LongString(LongString::from("at-least-once")));
    args.insert("x-overflow".into(), AMQPValue::LongString(LongString::from("reject-publish")));
    args
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() }
}

/// Why a job queue could not be declared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeclareError {
    /// The queue exists with other arguments (another `max_tries`): trying again cannot help.
    Inequivalent(String),
    /// Anything else (the broker went away, say): worth trying again.
    Other(String),
}

impl std::fmt::Display for DeclareError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeclareError::Inequivalent(m) | DeclareError::Other(m) => f.write_str(m),
        }
    }
}

/// The AMQP reply code of a broker's refusal, if `error` is one.
fn reply_code(error: &lapin::Error) -> Option<u16> {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(e) => Some(e.get_id()),
        _ => None,
    }
}

/// Declares the job queue `queue` with the arguments for `max_tries` (the server's side), on
/// channels of its own, since the broker closes a channel whose declaration it refuses.
///
/// When the queue exists with other arguments (`max_tries` changed) and no job waits in it, it
/// is deleted and made again with the new limit; workers consuming it see their consumer
/// cancelled and find the new queue. When it still holds jobs it is left alone, and the
/// answer is [`DeclareError::Inequivalent`] with a reason that says what to do.
pub async fn declare_job_queue(connection: &Connection, queue: &str, max_tries: u32) -> Result<(), DeclareError> {
    if try_declare(connection, queue, max_tries).await? {
        return Ok(());
    }
    // Quorum queues refuse `if-empty` deletion (as a connection error), so the queue is
    // looked at first: a job published between the look and the deletion would be lost, which
    // only a server with the old max_tries, publishing at that moment, can do.
    let waiting = job_queue_waiting(connection, queue).await.map_err(DeclareError::Other)?;
    if waiting.is_some_and(|n| n > 0) {
        return Err(DeclareError::Inequivalent(format!(
            "the job queue {queue} exists with another delivery limit than [broker] max_tries = {max_tries} \
             asks for (a quorum queue's arguments cannot change), and it still holds jobs, so it is not \
             replaced: set max_tries back until it is empty (or delete it: rabbitmqctl delete_queue '{queue}'), \
             and the next step makes it again with the new limit"
        )));
    }
    let channel =
        connection.create_channel().await.map_err(|e| DeclareError::Other(format!("cannot open a channel: {e}")))?;
    channel
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await
        .map_err(|e| DeclareError::Other(format!("cannot replace the queue {queue}: {e}")))?;
    let _ = channel.close(200, "OK".into()).await;
    tracing::warn!(%queue, max_tries, "the empty job queue had another delivery limit; it is made again with this max_tries");
    if try_declare(connection, queue, max_tries).await? {
        Ok(())
    } else {
        Err(DeclareError::Inequivalent(format!(
            "the job queue {queue} was made again with other arguments than [broker] max_tries = {max_tries} \
             gives: does another server with another max_tries use this broker?"
        )))
    }
}

/// One declaration of a job queue: `Ok(false)` when the broker refuses it because the queue
/// exists with other arguments.
async fn try_declare(connection: &Connection, queue: &str, max_tries: u32) -> Result<bool, DeclareError> {
    let channel =
        connection.create_channel().await.map_err(|e| DeclareError::Other(format!("cannot open a channel: {e}")))?;
    match channel.queue_declare(queue.into(), durable(), job_queue_arguments(max_tries)).await {
        Ok(_) => {
            let _ = channel.close(200, "OK".into()).await;
            Ok(true)
        }
        // 406 PRECONDITION_FAILED: inequivalent arguments.
        Err(e) if reply_code(&e) == Some(406) => Ok(false),
        Err(e) => Err(DeclareError::Other(format!("cannot declare the queue {queue}: {e}"))),
    }
}

/// How many jobs wait in a job queue, or `None` when it does not exist, asked without
/// asserting its arguments (a worker's side: the server makes job queues). The question uses
/// a channel of its own, since the broker closes a channel on which a passive declaration
/// found nothing.
pub async fn job_queue_waiting(connection: &Connection, queue: &str) -> Result<Option<u32>, String> {
    let channel = connection.create_channel().await.map_err(|e| format!("cannot open a channel: {e}"))?;
    let passive = QueueDeclareOptions { passive: true, durable: true, ..QueueDeclareOptions::default() };
    match channel.queue_declare(queue.into(), passive, FieldTable::default()).await {
        Ok(found) => {
            let _ = channel.close(200, "OK".into()).await;
            Ok(Some(found.message_count()))
        }
        // 404 NOT_FOUND: the server has not published to it yet.
        Err(e) if reply_code(&e) == Some(404) => Ok(None),
        Err(e) => Err(format!("cannot look for the queue {queue}: {e}")),
    }
}

/// Declares the dead-letter exchange and its queue.
pub async fn declare_dead_letters(channel: &Channel) -> Result<(), String> {
    channel
        .exchange_declare(
            DEAD_LETTER_EXCHANGE.into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() },
            FieldTable::default(),
        )
        .await
        .map_err(|e| format!("cannot declare the exchange {DEAD_LETTER_EXCHANGE}: {e}"))?;
    channel
        .queue_declare(DEAD_LETTER_QUEUE.into(), durable(), quorum_arguments())
        .await
        .map_err(|e| format!("cannot declare the queue {DEAD_LETTER_QUEUE}: {e}"))?;
    channel
        .queue_bind(
            DEAD_LETTER_QUEUE.into(),
            DEAD_LETTER_EXCHANGE.into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| format!("cannot bind {DEAD_LETTER_QUEUE}: {e}"))
}

/// A channel in confirm mode, for publishing.
pub async fn confirm_channel(connection: &Connection) -> Result<Channel, String> {
    let channel = connection.create_channel().await.map_err(|e| format!("cannot open a channel: {e}"))?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| format!("cannot turn on publisher confirms: {e}"))?;
    declare_dead_letters(&channel).await?;
    Ok(channel)
}

/// A channel for consuming, taking one unacknowledged job per consumer at a time.
pub async fn consume_channel(connection: &Connection) -> Result<Channel, String> {
    let channel = connection.create_channel().await.map_err(|e| format!("cannot open a channel: {e}"))?;
    channel.basic_qos(1, BasicQosOptions::default()).await.map_err(|e| format!("cannot set the prefetch: {e}"))?;
    declare_dead_letters(&channel).await?;
    Ok(channel)
}

/// Publishes `body` to `queue` as a persistent message and waits for the broker's confirm:
/// `Ok` means the broker holds it on disk (a quorum queue confirms once a majority of its
/// replicas wrote it).
pub async fn publish(channel: &Channel, queue: &str, body: &[u8]) -> Result<(), String> {
    let confirm = channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions { mandatory: true, ..BasicPublishOptions::default() },
            body,
            BasicProperties::default().with_delivery_mode(2).with_content_type("application/json".into()),
        )
        .await
        .map_err(|e| format!("cannot publish to {queue}: {e}"))?
        .await
        .map_err(|e| format!("no confirm from the broker for {queue}: {e}"))?;
    if confirm.is_nack() {
        return Err(format!("the broker refused the job on {queue}"));
    }
    if confirm.take_message().is_some() {
        return Err(format!("the queue {queue} does not exist: the job was returned"));
    }
    Ok(())
}

/// How many times a message was handed back to its queue, from the quorum queue's
/// `x-delivery-count` header (absent on the first delivery).
pub fn delivery_count(properties: &BasicProperties) -> u64 {
    properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-delivery-count").cloned())
        .and_then(|v| match v {
            AMQPValue::LongLongInt(n) => u64::try_from(n).ok(),
            AMQPValue::LongInt(n) => u64::try_from(n).ok(),
            AMQPValue::LongUInt(n) => Some(u64::from(n)),
            AMQPValue::ShortInt(n) => u64::try_from(n).ok(),
            _ => None,
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_password_is_kept_out_of_messages() {
        assert_eq!(super::redact("amqp://cib:hunter2@mq.example:5671/%2f"), "amqp://cib:***@mq.example:5671/%2f");
        assert_eq!(super::redact("amqp://127.0.0.1:5672"), "amqp://127.0.0.1:5672");
    }
}
