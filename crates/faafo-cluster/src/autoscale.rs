//! Worker autoscaling from the queue (seed 001: "the system would do this itself").
//!
//! Every second the supervisor reads the queue from an API instance (`/v1/nodes`) and
//! [`Autoscaler::decide`]s how many workers there should be: one per task waiting or
//! running, within MIN..MAX, at once when a backlog appears; fewer only after the queue
//! has been empty for the scale-down delay, so a burst followed by a pause does not
//! stop workers it will need again. A worker scaled down is stopped as any other: it
//! finishes its task within its grace period or gives it back to the queue.

use std::time::{Duration, Instant};

use faafo_core::node::QueueView;

/// How often the queue is read.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// The scale-down delay when none is given.
pub const DEFAULT_SCALE_DOWN_AFTER: Duration = Duration::from_secs(30);

/// `worker=MIN..MAX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Range {
    pub min: u32,
    pub max: u32,
}

/// Parses `worker=MIN..MAX` (workers are the only autoscaled role).
pub fn parse_range(text: &str, most: u32) -> Result<Range, String> {
    let (role, range) = text
        .split_once('=')
        .ok_or_else(|| format!("expected worker=MIN..MAX (worker=1..6), got {text:?}"))?;
    if !matches!(role, "worker" | "workers") {
        return Err(format!(
            "only workers are autoscaled (worker=MIN..MAX), got {role:?}"
        ));
    }
    let (min, max) = range
        .split_once("..")
        .ok_or_else(|| format!("expected MIN..MAX (1..6), got {range:?}"))?;
    let number = |text: &str| {
        text.trim()
            .parse::<u32>()
            .map_err(|_| format!("{text:?} is not a count"))
    };
    let (min, max) = (number(min)?, number(max)?);
    if min > max || max == 0 || max > most {
        return Err(format!(
            "worker={min}..{max}: need MIN <= MAX, MAX from 1 to {most}"
        ));
    }
    Ok(Range { min, max })
}

/// What the autoscaler settled on, and why: `cluster status` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub target: u32,
    pub reason: String,
}

/// The worker autoscaler's state: its range and how long the queue has been idle.
#[derive(Debug, Clone)]
pub struct Autoscaler {
    pub range: Range,
    pub scale_down_after: Duration,
    /// Since when fewer workers would do (no task waiting).
    idle_since: Option<Instant>,
    pub last: Option<Decision>,
}

impl Autoscaler {
    pub fn new(range: Range, scale_down_after: Duration) -> Autoscaler {
        Autoscaler {
            range,
            scale_down_after,
            idle_since: None,
            last: None,
        }
    }

    /// How many workers there should be, given the queue and `current` workers.
    pub fn decide(&mut self, queue: &QueueView, current: u32, now: Instant) -> Decision {
        let Range { min, max } = self.range;
        // Each worker renders one task at a time.
        let busy = u32::try_from(queue.running).unwrap_or(u32::MAX);
        let waiting = u32::try_from(queue.queued).unwrap_or(u32::MAX);
        let needed = busy.saturating_add(waiting).clamp(min, max);
        let decision = if waiting > 0 {
            self.idle_since = None;
            let age = queue
                .oldest_queued_age_s
                .map_or(String::new(), |age| format!(", the oldest for {age:.0} s"));
            Decision {
                target: needed.max(current.clamp(min, max)),
                reason: format!("{waiting} task(s) waiting{age}, {busy} running"),
            }
        } else if needed >= current {
            self.idle_since = None;
            Decision {
                target: needed,
                reason: format!("no task waiting, {busy} running"),
            }
        } else {
            let since = *self.idle_since.get_or_insert(now);
            let idle = now.saturating_duration_since(since);
            if idle >= self.scale_down_after {
                self.idle_since = None;
                Decision {
                    target: needed,
                    reason: format!(
                        "no task waiting for {:.0} s, {busy} running",
                        idle.as_secs_f64()
                    ),
                }
            } else {
                Decision {
                    target: current,
                    reason: format!(
                        "no task waiting, {busy} running: down to {needed} in {:.0} s unless work comes",
                        (self.scale_down_after - idle).as_secs_f64()
                    ),
                }
            }
        };
        self.last = Some(decision.clone());
        decision
    }

    /// `cluster status`'s line.
    pub fn describe(&self, current: u32) -> String {
        let Range { min, max } = self.range;
        match &self.last {
            Some(decision) => format!(
                "autoscaling workers {min}..{max}: {current} now, target {} ({})",
                decision.target, decision.reason
            ),
            None => format!("autoscaling workers {min}..{max}: {current} now, no reading yet"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(queued: u64, running: u64) -> QueueView {
        QueueView {
            queued,
            running,
            done: 0,
            failed: 0,
            oldest_queued_age_s: (queued > 0).then_some(3.0),
        }
    }

    #[test]
    fn ranges_parse_with_clear_errors() {
        assert_eq!(parse_range("worker=1..6", 64), Ok(Range { min: 1, max: 6 }));
        assert_eq!(
            parse_range("workers=0..3", 64),
            Ok(Range { min: 0, max: 3 })
        );
        assert!(
            parse_range("api=1..3", 64)
                .unwrap_err()
                .contains("only workers")
        );
        assert!(
            parse_range("worker=5..2", 64)
                .unwrap_err()
                .contains("MIN <= MAX")
        );
        assert!(
            parse_range("worker=1..100", 64)
                .unwrap_err()
                .contains("1 to 64")
        );
        assert!(
            parse_range("worker=3", 64)
                .unwrap_err()
                .contains("MIN..MAX")
        );
    }

    #[test]
    fn a_backlog_scales_up_at_once_to_one_worker_per_task_within_the_range() {
        let mut scaler = Autoscaler::new(Range { min: 1, max: 6 }, Duration::from_secs(30));
        let now = Instant::now();
        assert_eq!(scaler.decide(&queue(200, 1), 1, now).target, 6);
        assert_eq!(scaler.decide(&queue(2, 1), 1, now).target, 3);
        // Never below what runs while work waits.
        assert_eq!(scaler.decide(&queue(1, 0), 5, now).target, 5);
        assert!(
            scaler
                .decide(&queue(4, 2), 1, now)
                .reason
                .contains("4 task(s) waiting")
        );
    }

    #[test]
    fn an_idle_queue_scales_down_only_after_the_delay_and_new_work_resets_it() {
        let mut scaler = Autoscaler::new(Range { min: 1, max: 6 }, Duration::from_secs(30));
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        assert_eq!(scaler.decide(&queue(0, 2), 6, at(0)).target, 6);
        assert!(
            scaler
                .decide(&queue(0, 2), 6, at(10))
                .reason
                .contains("in 20 s")
        );
        assert_eq!(scaler.decide(&queue(0, 0), 6, at(29)).target, 6);
        // Work arrives: the wait starts again.
        assert_eq!(scaler.decide(&queue(3, 3), 6, at(29)).target, 6);
        assert_eq!(scaler.decide(&queue(0, 0), 6, at(31)).target, 6);
        assert_eq!(scaler.decide(&queue(0, 0), 6, at(60)).target, 6);
        assert_eq!(scaler.decide(&queue(0, 0), 6, at(61)).target, 1);
        // Never below the range's minimum, and up to it at once.
        assert_eq!(scaler.decide(&queue(0, 0), 0, at(62)).target, 1);
    }
}
