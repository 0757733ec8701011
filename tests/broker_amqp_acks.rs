//! AMQP acks never cover a delivery the consumer has not handed over: against the real
//! RabbitMQ on 127.0.0.1:5672. A `multiple=true` ack settles every unacked tag up to
//! its own on the channel, so one that reaches over a delivery still inside lapin (on
//! another queue's consumer, or behind a `basic.cancel`) acks a message nobody saw: it
//! is gone. Each test counts every message: acked by the test, or back in its queue
//! once the consumer has given the rest back. Queue names are the test's own.

mod common;

use common::{amqp_cleanup as cleanup, amqp_consumer, amqp_depth, amqp_url as url, body_index};

use std::collections::HashSet;
use std::time::Duration;

use _core::broker::amqp::{AmqpConsumer, AmqpOptions, AmqpProducer};
use _core::broker::{Fetched, IncomingMessage};
use tokio::sync::mpsc;

fn unique(name: &str) -> String {
    format!("rs-amqp-acks-{name}-{}", uuid::Uuid::new_v4().simple())
}

/// `total` messages numbered `0..total`, sent round-robin to `queues`, all confirmed.
async fn publish_round_robin(queues: &[String], total: usize) -> AmqpProducer {
    let producer = AmqpProducer::connect(&url(), AmqpOptions::default(), Vec::new())
        .await
        .expect("producer");
    for n in 0..total {
        let queue = &queues[n % queues.len()];
        producer
            .publish(common::message(queue, n, None))
            .expect("publish");
    }
    producer
        .flush(Duration::from_secs(30))
        .await
        .expect("flush");
    producer
}

/// The next delivery, or None once none has come for 3 s (the broker has nothing more
/// for this consumer: every message was delivered, or lost).
async fn next(rx: &mut mpsc::UnboundedReceiver<Fetched>) -> Option<IncomingMessage> {
    match tokio::time::timeout(Duration::from_secs(3), rx.recv()).await {
        Ok(Some(Fetched::Message(Ok(message)))) => Some(message),
        Ok(Some(Fetched::Message(Err(bad)))) => panic!("bad message: {bad:?}"),
        Ok(Some(Fetched::Error(err))) => panic!("consumer error: {err}"),
        Ok(None) | Err(_) => None,
    }
}

/// Give back whatever is unacked, then check that every one of `total` messages was
/// acked exactly once or is ready in its queue again.
async fn assert_none_lost(
    consumer: AmqpConsumer,
    acked: &HashSet<usize>,
    queues: &[String],
    total: usize,
) {
    consumer.restore_unacked().await.expect("restore");
    let mut ready = 0;
    for queue in queues {
        ready += amqp_depth(queue).await as usize;
    }
    assert_eq!(
        acked.len() + ready,
        total,
        "{} acked + {ready} ready of {total}: {} messages acked by a multiple=true ack \
         nobody saw",
        acked.len(),
        total.saturating_sub(acked.len() + ready),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_lose_nothing_when_several_queues_share_the_channel() {
    let queues: Vec<String> = (0..3).map(|i| unique(&format!("multi{i}"))).collect();
    const TOTAL: usize = 6000;
    let _producer = publish_round_robin(&queues, TOTAL).await;
    // Unbounded window: each queue's consumer buffers deliveries in lapin, and the
    // consumer reads them from one queue, then another, not in delivery-tag order.
    let (consumer, mut rx) = amqp_consumer(&queues, 0, AmqpOptions::default()).await;
    let mut acked = HashSet::new();
    while let Some(message) = next(&mut rx).await {
        assert!(acked.insert(body_index(&message)), "delivered twice");
        consumer.ack(vec![message.delivery_tag]).expect("ack");
        if acked.len() == TOTAL {
            break;
        }
    }
    let names: Vec<&str> = queues.iter().map(String::as_str).collect();
    assert_none_lost(consumer, &acked, &queues, TOTAL).await;
    cleanup(&names).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_lose_nothing_across_a_cancel_and_consume_again() {
    // What `-O fair` does before a long task: stop consuming, give back what was
    // fetched and not started, and consume again afterwards. Deliveries sent before the
    // cancel-ok are still in the cancelled consumer's buffer when the new one starts.
    let queue = unique("pause");
    let queues = vec![queue.clone()];
    const TOTAL: usize = 3000;
    let _producer = publish_round_robin(&queues, TOTAL).await;
    let (consumer, mut rx) = amqp_consumer(&queues, 50, AmqpOptions::default()).await;
    let mut acked = HashSet::new();
    let mut since_pause = 0;
    while let Some(message) = next(&mut rx).await {
        assert!(acked.insert(body_index(&message)), "acked twice");
        consumer.ack(vec![message.delivery_tag]).expect("ack");
        if acked.len() == TOTAL {
            break;
        }
        since_pause += 1;
        if since_pause == 40 {
            since_pause = 0;
            assert!(consumer.cancel_queue(&queue).await.expect("cancel"));
            let mut given_back = Vec::new();
            while let Ok(Fetched::Message(Ok(message))) = rx.try_recv() {
                given_back.push(message.delivery_tag);
            }
            for tag in given_back {
                consumer.reject(tag, true).expect("give back");
            }
            assert!(consumer.add_queue(&queue).await.expect("consume again"));
        }
    }
    assert_none_lost(consumer, &acked, &queues, TOTAL).await;
    cleanup(&[&queue]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_lose_nothing_when_one_of_several_queues_is_cancelled() {
    // `cancel_consumer` from remote control: one queue stops, the others go on; what
    // the cancelled queue had delivered is still handed over and acked.
    let queues: Vec<String> = (0..2).map(|i| unique(&format!("cancel{i}"))).collect();
    const TOTAL: usize = 4000;
    let _producer = publish_round_robin(&queues, TOTAL).await;
    let (consumer, mut rx) = amqp_consumer(&queues, 200, AmqpOptions::default()).await;
    let mut acked = HashSet::new();
    let mut cancelled = false;
    while let Some(message) = next(&mut rx).await {
        assert!(acked.insert(body_index(&message)), "acked twice");
        consumer.ack(vec![message.delivery_tag]).expect("ack");
        if !cancelled && acked.len() == 300 {
            cancelled = true;
            assert!(consumer.cancel_queue(&queues[0]).await.expect("cancel"));
        }
    }
    let names: Vec<&str> = queues.iter().map(String::as_str).collect();
    assert_none_lost(consumer, &acked, &queues, TOTAL).await;
    cleanup(&names).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_hands_over_everything_the_queue_delivered_before_it_answers() {
    // -O fair gives back what the consumer holds right after the cancel: it must hold
    // every delivery the broker sent before its cancel-ok, none left inside lapin.
    let queue = unique("handover");
    let queues = vec![queue.clone()];
    const TOTAL: usize = 3000;
    let _producer = publish_round_robin(&queues, TOTAL).await;
    let (consumer, mut rx) = amqp_consumer(&queues, 0, AmqpOptions::default()).await;
    assert!(consumer.cancel_queue(&queue).await.expect("cancel"));
    let mut handed_over = 0;
    while let Ok(Fetched::Message(Ok(_))) = rx.try_recv() {
        handed_over += 1;
    }
    let delivered = TOTAL - amqp_depth(&queue).await as usize;
    assert_eq!(
        handed_over, delivered,
        "still inside lapin when the cancel answered"
    );
    consumer.restore_unacked().await.expect("restore");
    assert_eq!(amqp_depth(&queue).await as usize, TOTAL);
    cleanup(&[&queue]).await;
}
