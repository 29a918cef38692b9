//! One sync of an integration at a time.
//!
//! Two jobs of one integration must never run at once: they would spend each other's rotating
//! refresh tokens, and write the same shards and cursors. So a job holds its integration for as
//! long as it runs ([`RunningSync`] on the integration, claimed under its etag), and a job that
//! finds another holding it waits: it is put back on its queue for later, not failed.
//!
//! The holder is a *chain*: a job, its retries and its continuations share the first job's id,
//! and any job of the chain may take over (a redelivery after a crash resumes at once). The
//! chain holds the integration from the moment the scheduler claims it until its last job ends,
//! which is also what the tenant's concurrency limit counts. A lease that is not renewed lapses
//! (each page renews it), so a chain whose jobs all died stops holding the integration.
//!
//! Everything here is a plain decision over data; [`super::inbound`] does the reads and writes.

use chrono::{DateTime, Duration, Utc};

use crate::model::integration::{JobProgress, RunningSync};

/// How long a job holds its integration without renewing: longer than a function may run
/// (`functionTimeout`, 10 minutes), so only a dead job's lease lapses.
pub const LEASE: Duration = Duration::minutes(15);

/// How long a chain holds its integration while its next job waits in the queue: the first
/// one the scheduler sent, a continuation, a retry. A queue backed up (a tick after downtime
/// sends hundreds) makes that wait far longer than a job runs; a chain whose hold lapsed in
/// it would forget the entities it finished and read them again.
pub const QUEUED_LEASE: Duration = Duration::minutes(60);

/// The chain a job belongs to: its id without a continuation's `+N`.
pub fn chain_of(job_id: &str) -> &str {
    match job_id.rsplit_once('+') {
        Some((root, n)) if n.parse::<u32>().is_ok() => chain_of(root),
        _ => job_id,
    }
}

/// What a job finds when it wants to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// Free, lapsed, or already its chain's: the job runs.
    Run,
    /// Another chain runs; try again after the wait.
    Wait { holder: String, retry_in: Duration },
}

/// Whether `job_id` may run now, given the integration's current holder. A job that waits is
/// put back with a growing delay (5 s, 10 s, ... at most a minute, never past the holder's
/// lease), so a short job behind another starts soon and a long one costs few messages.
pub fn claim(
    running: Option<&RunningSync>,
    job_id: &str,
    deferrals: u32,
    now: DateTime<Utc>,
) -> Claim {
    match running {
        Some(held) if held.until > now && held.chain != chain_of(job_id) => {
            let backoff = Duration::seconds(5 << deferrals.min(4)).min(Duration::minutes(1));
            Claim::Wait {
                holder: held.job_id.clone(),
                retry_in: backoff.min(held.until - now).max(Duration::seconds(1)),
            }
        }
        _ => Claim::Run,
    }
}

/// The integration's holder once `job_id` runs: the chain's, renewed, keeping the job's
/// progress if the job resumes.
pub fn hold(running: Option<&RunningSync>, job_id: &str, now: DateTime<Utc>) -> RunningSync {
    let chain = chain_of(job_id);
    let same_chain = running.filter(|r| r.chain == chain && r.until > now);
    RunningSync {
        chain: chain.to_string(),
        job_id: job_id.to_string(),
        since: same_chain.map_or(now, |r| r.since),
        until: now + LEASE,
        progress: same_chain
            .filter(|r| r.job_id == job_id)
            .and_then(|r| r.progress.clone()),
        finished_in_chain: same_chain
            .map(|r| r.finished_in_chain.clone())
            .unwrap_or_default(),
    }
}

/// The hold the scheduler takes when it claims a due integration for `job_id`, before the job
/// starts.
pub fn queued(job_id: &str, now: DateTime<Utc>) -> RunningSync {
    RunningSync {
        chain: chain_of(job_id).to_string(),
        job_id: job_id.to_string(),
        since: now,
        until: now + QUEUED_LEASE,
        progress: None,
        finished_in_chain: Vec::new(),
    }
}

/// Whether a sync holds the integration at `now`.
pub fn is_held(running: Option<&RunningSync>, now: DateTime<Utc>) -> bool {
    running.is_some_and(|r| r.until > now)
}

/// Whether `job_id`'s chain holds the integration at `now`: its job ran before the scheduler
/// that sent it had claimed the integration for it.
pub fn is_held_by_chain(running: Option<&RunningSync>, job_id: &str, now: DateTime<Utc>) -> bool {
    running.is_some_and(|r| r.until > now && r.chain == chain_of(job_id))
}

/// The hold, if it is `job_id`'s chain's.
fn chains<'a>(running: &'a mut Option<RunningSync>, job_id: &str) -> Option<&'a mut RunningSync> {
    running.as_mut().filter(|r| r.chain == chain_of(job_id))
}

/// Whether `job_id` still holds the integration: what a job checks before it writes anything
/// a job that took over would own. A hold that lapsed with nobody taking it is still the
/// job's, as for [`checkpoint`].
pub fn holds(running: Option<&RunningSync>, job_id: &str) -> bool {
    running.is_some_and(|r| r.job_id == job_id)
}

/// After a page: the job's progress kept, its hold renewed. `false` if the job no longer holds
/// the integration (its lease lapsed and another chain took it).
pub fn checkpoint(
    running: &mut Option<RunningSync>,
    job_id: &str,
    progress: JobProgress,
    now: DateTime<Utc>,
) -> bool {
    match running.as_mut().filter(|r| r.job_id == job_id) {
        Some(held) => {
            held.progress = Some(progress);
            held.until = now + LEASE;
            true
        }
        None => false,
    }
}

/// Between pages (a long reconciliation): the job's hold renewed, its progress left as the
/// last checkpoint wrote it, which is where a redelivery resumes. `false` if the job no longer
/// holds the integration.
pub fn renew(running: &mut Option<RunningSync>, job_id: &str, now: DateTime<Utc>) -> bool {
    match running.as_mut().filter(|r| r.job_id == job_id) {
        Some(held) => {
            held.until = now + LEASE;
            true
        }
        None => false,
    }
}

/// A retry of the job is scheduled `at`: the chain keeps the integration through the wait,
/// and the retry's time in the queue, with the job's progress, so the retry resumes the work.
pub fn wait_for_retry(running: &mut Option<RunningSync>, job_id: &str, at: DateTime<Utc>) -> bool {
    match chains(running, job_id) {
        Some(held) => {
            held.until = at + QUEUED_LEASE;
            true
        }
        None => false,
    }
}

/// The job stopped at its record limit, having finished `finished` (entity names): the chain
/// goes on in `next_job_id`, which counts its own work and leaves those entities alone, and
/// holds the integration while it waits in the queue.
pub fn hand_over(
    running: &mut Option<RunningSync>,
    job_id: &str,
    next_job_id: &str,
    finished: &[String],
    now: DateTime<Utc>,
) {
    if let Some(held) = chains(running, job_id) {
        held.job_id = next_job_id.to_string();
        held.progress = None;
        held.until = now + QUEUED_LEASE;
        for entity in finished {
            if !held.finished_in_chain.contains(entity) {
                held.finished_in_chain.push(entity.clone());
            }
        }
    }
}

/// The chain ended: the integration is free (unless another chain holds it by now). Returns
/// the chain that let go, if it held the integration.
pub fn release(running: &mut Option<RunningSync>, job_id: &str) -> Option<String> {
    chains(running, job_id)?;
    running.take().map(|held| held.chain)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(minute: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 22, 10, minute, 0).unwrap()
    }

    fn held_by(job_id: &str, until: DateTime<Utc>) -> RunningSync {
        RunningSync {
            chain: chain_of(job_id).to_string(),
            job_id: job_id.to_string(),
            since: at(0),
            until,
            progress: None,
            finished_in_chain: Vec::new(),
        }
    }

    #[test]
    fn a_renewal_extends_the_hold_and_leaves_the_progress_to_the_checkpoints() {
        let progress = JobProgress {
            pages: 3,
            ..JobProgress::default()
        };
        let mut running = Some(RunningSync {
            progress: Some(progress.clone()),
            ..held_by("job_full", at(15))
        });
        assert!(renew(&mut running, "job_full", at(10)));
        let held = running.as_ref().unwrap();
        assert_eq!(held.until, at(10) + LEASE);
        assert_eq!(held.progress, Some(progress));
        assert!(!renew(&mut running, "job_other", at(11)), "not its hold");
    }

    #[test]
    fn continuations_and_retries_belong_to_their_first_jobs_chain() {
        assert_eq!(chain_of("job_1"), "job_1");
        assert_eq!(chain_of("job_1+3"), "job_1");
        assert_eq!(chain_of("job_a+b"), "job_a+b");
    }

    #[test]
    fn a_second_chain_waits_while_the_first_holds_the_integration() {
        let full = held_by("job_full", at(15));
        assert_eq!(
            claim(Some(&full), "job_incremental", 0, at(1)),
            Claim::Wait {
                holder: "job_full".into(),
                retry_in: Duration::seconds(5)
            }
        );
        let Claim::Wait { retry_in, .. } = claim(Some(&full), "job_incremental", 9, at(1)) else {
            panic!("waits");
        };
        assert_eq!(
            retry_in,
            Duration::minutes(1),
            "the wait grows, to a minute"
        );
        let Claim::Wait { retry_in, .. } = claim(Some(&full), "wh_1", 9, at(14)) else {
            panic!("waits");
        };
        assert_eq!(retry_in, Duration::minutes(1).min(at(15) - at(14)));
    }

    #[test]
    fn the_same_chain_a_free_or_a_lapsed_integration_runs_at_once() {
        let full = held_by("job_full", at(15));
        assert_eq!(claim(Some(&full), "job_full", 0, at(1)), Claim::Run);
        assert_eq!(claim(Some(&full), "job_full+2", 0, at(1)), Claim::Run);
        assert_eq!(claim(None, "job_other", 0, at(1)), Claim::Run);
        assert_eq!(claim(Some(&full), "job_other", 0, at(16)), Claim::Run);
    }

    #[test]
    fn a_chain_keeps_the_integration_through_retries_and_continuations_then_frees_it() {
        let mut running = Some(hold(None, "job_1", at(0)));
        assert!(checkpoint(
            &mut running,
            "job_1",
            JobProgress::default(),
            at(5)
        ));
        assert_eq!(running.as_ref().unwrap().until, at(5) + LEASE);
        assert!(running.as_ref().unwrap().progress.is_some());

        assert!(wait_for_retry(&mut running, "job_1", at(30)));
        assert_eq!(running.as_ref().unwrap().until, at(30) + QUEUED_LEASE);
        assert!(
            running.as_ref().unwrap().progress.is_some(),
            "the retry resumes"
        );

        hand_over(&mut running, "job_1", "job_1+1", &[], at(31));
        let held = running.as_ref().unwrap();
        assert_eq!(
            (held.chain.as_str(), held.job_id.as_str()),
            ("job_1", "job_1+1")
        );
        assert!(held.progress.is_none());
        assert_eq!(
            held.until,
            at(31) + QUEUED_LEASE,
            "held while the continuation waits its turn in a busy queue"
        );
        assert!(
            !checkpoint(&mut running, "job_1", JobProgress::default(), at(32)),
            "the handed-over job no longer checkpoints"
        );

        release(&mut running, "job_other");
        assert!(running.is_some(), "another chain cannot free it");
        release(&mut running, "job_1+1");
        assert!(running.is_none());
        assert!(!is_held(running.as_ref(), at(32)));
        assert!(is_held(Some(&queued("job_2", at(32))), at(33)));
        assert!(!is_held(
            Some(&queued("job_2", at(0))),
            at(0) + QUEUED_LEASE
        ));
    }

    #[test]
    fn holding_renews_the_lease_and_keeps_only_the_same_jobs_progress() {
        let mut held = held_by("job_1", at(15));
        held.progress = Some(Default::default());
        let resumed = hold(Some(&held), "job_1", at(5));
        assert_eq!(resumed.until, at(5) + LEASE);
        assert_eq!(resumed.since, at(0));
        assert!(resumed.progress.is_some());
        let continued = hold(Some(&held), "job_1+1", at(5));
        assert_eq!(continued.chain, "job_1");
        assert!(
            continued.progress.is_none(),
            "a continuation counts its own work"
        );
        let other = hold(Some(&held), "job_2", at(20));
        assert_eq!((other.chain.as_str(), other.since), ("job_2", at(20)));
    }

    #[test]
    fn a_chain_remembers_the_entities_its_jobs_finished_and_another_chain_does_not() {
        let mut running = Some(hold(None, "job_1", at(0)));
        hand_over(&mut running, "job_1", "job_1+1", &["Account".into()], at(1));
        let continued = hold(running.as_ref(), "job_1+1", at(2));
        assert_eq!(continued.finished_in_chain, ["Account"]);
        running = Some(continued);
        let finished = ["Account".into(), "Contact".into()];
        hand_over(&mut running, "job_1+1", "job_1+2", &finished, at(3));
        let last = hold(running.as_ref(), "job_1+2", at(4));
        assert_eq!(last.finished_in_chain, ["Account", "Contact"]);
        let next_chain = hold(Some(&last), "job_2", at(30));
        assert!(next_chain.finished_in_chain.is_empty());
    }
}
