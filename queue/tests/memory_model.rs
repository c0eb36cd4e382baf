//! Model-based property test: the memory backend against a simple reference
//! model, over random sequences of operations under paused time.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

use keel_queue::{
    DequeueOptions, Job, MemoryQueue, Nack, Priority, Queue, QueueConfig, QueueError,
};
use proptest::prelude::*;

const CAPACITY: u64 = 8;
const MAX_ATTEMPTS: u32 = 3;
const LEASE: Duration = Duration::from_millis(1_000);
const RETRY_AFTER: Duration = Duration::from_millis(300);

#[derive(Debug, Clone)]
enum Op {
    Enqueue { priority: u8, key: Option<u8> },
    Dequeue { max: usize },
    Ack { pick: usize },
    Retry { pick: usize },
    DeadLetter { pick: usize },
    Release { pick: usize },
    Advance { ms: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..3, proptest::option::weighted(0.3, 0u8..4)).prop_map(|(priority, key)| Op::Enqueue { priority, key }),
        3 => (1usize..4).prop_map(|max| Op::Dequeue { max }),
        2 => any::<usize>().prop_map(|pick| Op::Ack { pick }),
        1 => any::<usize>().prop_map(|pick| Op::Retry { pick }),
        1 => any::<usize>().prop_map(|pick| Op::DeadLetter { pick }),
        1 => any::<usize>().prop_map(|pick| Op::Release { pick }),
        2 => (0u64..1_500).prop_map(|ms| Op::Advance { ms }),
    ]
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Where {
    Ready,
    Delayed { due: u64 },
    Leased { expires: u64, token: u64 },
}

#[derive(Debug)]
struct ModelJob {
    seq: u64,
    priority: u8,
    attempts: u32,
    place: Where,
}

/// The reference: plain maps and a clock in milliseconds.
#[derive(Debug, Default)]
struct Model {
    now: u64,
    next_seq: u64,
    next_token: u64,
    jobs: BTreeMap<u64, ModelJob>, // by payload number
    ready: [VecDeque<u64>; 3],
    dead: u64,
    keys: HashMap<u8, u64>,
}

impl Model {
    fn maintain(&mut self) {
        let mut due: Vec<(u64, u64, u64)> = self
            .jobs
            .iter()
            .filter_map(|(p, j)| match j.place {
                Where::Delayed { due } if due <= self.now => Some((due, j.seq, *p)),
                _ => None,
            })
            .collect();
        due.sort();
        for (_, _, p) in due {
            let job = self.jobs.get_mut(&p).unwrap();
            job.place = Where::Ready;
            self.ready[job.priority as usize].push_back(p);
        }
        let mut expired: Vec<(u64, u64, u64, u64)> = self
            .jobs
            .iter()
            .filter_map(|(p, j)| match j.place {
                Where::Leased { expires, token } if expires <= self.now => {
                    Some((expires, j.seq, token, *p))
                }
                _ => None,
            })
            .collect();
        expired.sort();
        for (_, _, _, p) in expired {
            let job = self.jobs.get_mut(&p).unwrap();
            if job.attempts >= MAX_ATTEMPTS {
                self.jobs.remove(&p);
                self.dead += 1;
            } else {
                job.place = Where::Ready;
                self.ready[job.priority as usize].push_back(p);
            }
        }
    }

    fn dequeue(&mut self, max: usize) -> Vec<u64> {
        self.maintain();
        let mut out = Vec::new();
        for level in (0..3).rev() {
            while out.len() < max {
                let Some(p) = self.ready[level].pop_front() else {
                    break;
                };
                let token = self.next_token;
                self.next_token += 1;
                let job = self.jobs.get_mut(&p).unwrap();
                job.attempts += 1;
                job.place = Where::Leased {
                    expires: self.now + LEASE.as_millis() as u64,
                    token,
                };
                out.push(p);
            }
        }
        out
    }

    fn leased_valid(&self, p: u64) -> bool {
        matches!(self.jobs.get(&p), Some(ModelJob { place: Where::Leased { expires, .. }, .. }) if *expires > self.now)
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn memory_queue_matches_the_model(ops in proptest::collection::vec(op(), 1..80)) {
        keel_testkit::paused_runtime().block_on(async move {
            let queue = MemoryQueue::new(
                QueueConfig::new("model").capacity(CAPACITY).max_attempts(MAX_ATTEMPTS),
            )
            .unwrap();
            let mut model = Model::default();
            let mut payload_no = 0u64;
            // Receipts we hold, by payload number (latest delivery only).
            let mut held: Vec<(u64, keel_queue::Receipt)> = Vec::new();
            for op in ops {
                match op {
                    Op::Enqueue { priority, key } => {
                        let p = payload_no;
                        payload_no += 1;
                        let mut job = Job::new(p.to_string()).priority(Priority(priority));
                        if let Some(k) = key {
                            job = job.idempotency_key(format!("k{k}"));
                        }
                        let got = queue.enqueue(job).await;
                        if let Some(k) = key.filter(|k| model.keys.contains_key(k)) {
                            let _ = k;
                            prop_assert!(got.unwrap().duplicate);
                        } else if model.jobs.len() as u64 >= CAPACITY {
                            prop_assert!(matches!(got, Err(QueueError::Full { .. })), "{got:?}");
                        } else {
                            prop_assert!(!got.unwrap().duplicate);
                            if let Some(k) = key {
                                model.keys.insert(k, p);
                            }
                            model.jobs.insert(p, ModelJob { seq: model.next_seq, priority, attempts: 0, place: Where::Ready });
                            model.next_seq += 1;
                            model.ready[priority as usize].push_back(p);
                        }
                    }
                    Op::Dequeue { max } => {
                        let got = queue
                            .dequeue(DequeueOptions { max, wait: Duration::ZERO, lease: LEASE })
                            .await
                            .unwrap();
                        let expected = model.dequeue(max);
                        let got_payloads: Vec<u64> = got
                            .iter()
                            .map(|d| std::str::from_utf8(&d.payload).unwrap().parse().unwrap())
                            .collect();
                        prop_assert_eq!(&got_payloads, &expected);
                        for d in got {
                            let p: u64 = std::str::from_utf8(&d.payload).unwrap().parse().unwrap();
                            prop_assert_eq!(d.attempt, model.jobs[&p].attempts);
                            held.retain(|(q, _)| *q != p);
                            held.push((p, d.receipt));
                        }
                    }
                    Op::Ack { pick } | Op::Retry { pick } | Op::DeadLetter { pick } | Op::Release { pick } if !held.is_empty() => {
                        let (p, receipt) = held.remove(pick % held.len());
                        model.maintain();
                        let valid = model.leased_valid(p);
                        let result = match op {
                            Op::Ack { .. } => queue.ack(&receipt).await,
                            Op::Retry { .. } => queue.nack(&receipt, Nack::retry_after(RETRY_AFTER, "model says retry")).await,
                            Op::Release { .. } => queue.nack(&receipt, Nack::release("model says release")).await,
                            _ => queue.nack(&receipt, Nack::dead_letter("model says die")).await,
                        };
                        if !valid {
                            prop_assert!(matches!(result, Err(QueueError::InvalidReceipt(_))), "{result:?}");
                            continue;
                        }
                        prop_assert!(result.is_ok(), "{result:?}");
                        let job = model.jobs.get_mut(&p).unwrap();
                        match op {
                            Op::Ack { .. } => {
                                model.jobs.remove(&p);
                            }
                            Op::Retry { .. } if job.attempts >= MAX_ATTEMPTS => {
                                model.jobs.remove(&p);
                                model.dead += 1;
                            }
                            Op::Retry { .. } => {
                                job.place = Where::Delayed { due: model.now + RETRY_AFTER.as_millis() as u64 };
                            }
                            // Ready at once at the tail, the delivery not counted, never dead.
                            Op::Release { .. } => {
                                job.attempts -= 1;
                                job.place = Where::Ready;
                                model.ready[job.priority as usize].push_back(p);
                            }
                            _ => {
                                model.jobs.remove(&p);
                                model.dead += 1;
                            }
                        }
                    }
                    Op::Ack { .. } | Op::Retry { .. } | Op::DeadLetter { .. } | Op::Release { .. } => {}
                    Op::Advance { ms } => {
                        tokio::time::advance(Duration::from_millis(ms)).await;
                        model.now += ms;
                    }
                }
                let stats = queue.stats().await.unwrap();
                model.maintain();
                let ready = model.ready.iter().map(VecDeque::len).sum::<usize>() as u64;
                let delayed = model.jobs.values().filter(|j| matches!(j.place, Where::Delayed { .. })).count() as u64;
                let leased = model.jobs.values().filter(|j| matches!(j.place, Where::Leased { .. })).count() as u64;
                prop_assert_eq!((stats.ready, stats.delayed, stats.in_flight, stats.dead), (ready, delayed, leased, model.dead));
            }
            Ok(())
        })?;
    }
}
