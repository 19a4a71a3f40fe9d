//! The broker's side of things, on RabbitMQ through `lapin`: connecting, declaring the
//! topology both the server and the workers rely on, and publishing with confirms.
//!
//! Topology: one quorum queue per label set (`cib.jobs.os=macos`), durable, with a delivery
//! limit of [`DELIVERY_LIMIT`] and dead-lettering (at least once) to the fanout exchange
//! `cib.dead`, whose quorum queue `cib.dead` the server reads. Both sides declare the same
//! queues with the same arguments (a declaration with other arguments is refused by the
//! broker), so whichever comes first makes them.

use lapin::options::{
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

use crate::protocol::{DEAD_LETTER_EXCHANGE, DEAD_LETTER_QUEUE, DELIVERY_LIMIT};

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

/// The arguments of every job queue.
fn job_queue_arguments() -> FieldTable {
    let mut args = quorum_arguments();
    args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(i64::from(DELIVERY_LIMIT)));
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

/// Declares a job queue.
pub async fn declare_job_queue(channel: &Channel, queue: &str) -> Result<(), String> {
    channel
        .queue_declare(queue.into(), durable(), job_queue_arguments())
        .await
        .map(|_| ())
        .map_err(|e| format!("cannot declare the queue {queue}: {e}"))
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
