//! The engine alone, with a dummy flow: queue order, cancel, holds, panics, batched events,
//! follow-up jobs, restart recovery, an application that stops and starts being active.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_api::server::{IndexDone, JobKind, JobResult};
use cairn_catalog::{Catalog, Hold, JobRecord, JobState};
use serde_json::{Value, json};

use super::{App, Engine, Flow, JobCtx, JobSpec, recover, release_leftovers, start};
use crate::{Result, ServerError};

/// An application that records what it ran and released.
struct TestApp {
    engine: Engine<TestApp>,
    catalog: Arc<Catalog>,
    ran: Mutex<Vec<String>>,
    released: Mutex<Vec<Hold>>,
    release_fails: AtomicBool,
    active: AtomicBool,
}

impl App for TestApp {
    fn engine(&self) -> &Engine<Self> {
        &self.engine
    }

    fn release(&self, hold: &Hold) -> Result<()> {
        if self.release_fails.load(Ordering::SeqCst) {
            return Err(ServerError::Failed("peer away".into()));
        }
        self.released.lock().unwrap().push(hold.clone());
        Ok(())
    }

    fn describe(&self, hold: &Hold) -> String {
        match hold {
            Hold::StorageSnapshot { snapshot, .. } => format!("snapshot {snapshot}"),
            h => format!("{h:?}"),
        }
    }

    fn active(&self) -> bool {
        self.active.load(Ordering::SeqCst)
    }
}

fn snap(name: &str) -> Hold {
    Hold::StorageSnapshot {
        agent: "a".into(),
        snapshot: name.into(),
    }
}

/// Does what its parameters say, in this order: `log` lines, `hold` snapshots, `sleep_ms`
/// (no step boundary), `follow_up` a job, wait `until_cancel`, `fail` or `panic`. The engine
/// keeps a job's parameters typed without looking inside: the dummy's instructions travel as
/// JSON in the one free-text parameter there is (an index job's backup).
struct Dummy;

/// The dummy's instructions, as [`dummy`] packed them.
fn instructions(p: &JobKind) -> Value {
    match p {
        JobKind::Index { backup } => serde_json::from_str(backup).unwrap(),
        other => panic!("not a dummy job: {other:?}"),
    }
}

/// What the dummy answers: its `name`.
fn named(name: &str) -> JobResult {
    JobResult::Index(IndexDone {
        backup: name.into(),
        already_indexed: false,
        volumes: Vec::new(),
        files: 0,
        records_new: 0,
        records_shared: 0,
        bytes_written: 0,
    })
}

impl Flow<TestApp> for Dummy {
    fn kind(&self) -> &'static str {
        "dummy"
    }

    fn run(&self, ctx: &JobCtx<'_, TestApp>, p: &JobKind) -> Result<JobResult> {
        let p = &instructions(p);
        ctx.app
            .ran
            .lock()
            .unwrap()
            .push(p["name"].as_str().unwrap_or_default().into());
        for i in 0..p["log"].as_u64().unwrap_or(0) {
            ctx.info(format!("line {i}"));
        }
        for h in p["hold"].as_array().into_iter().flatten() {
            ctx.hold(snap(h.as_str().unwrap()))?;
        }
        if let Some(ms) = p["sleep_ms"].as_u64() {
            std::thread::sleep(Duration::from_millis(ms));
        }
        if let Some(name) = p["follow_up"].as_str() {
            ctx.submit(dummy(json!({ "name": name })))?;
        }
        if p["until_cancel"] == true {
            ctx.info("waiting");
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(10) {
                ctx.check_cancel()?;
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        if let Some(msg) = p["fail"].as_str() {
            return Err(ServerError::Failed(msg.into()));
        }
        if p["panic"] == true {
            panic!("dummy panics");
        }
        Ok(named(p["name"].as_str().unwrap_or_default()))
    }
}

fn dummy(params: Value) -> JobSpec {
    JobSpec {
        kind: "dummy".into(),
        vms: params["vms"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|v| v.as_str().unwrap().to_string())
            .collect(),
        params: JobKind::Index {
            backup: params.to_string(),
        },
    }
}

fn app_on(catalog: Arc<Catalog>, workers: usize) -> Arc<TestApp> {
    let app = Arc::new(TestApp {
        engine: Engine::new(catalog.clone(), workers).register(Dummy),
        catalog,
        ran: Mutex::default(),
        released: Mutex::default(),
        release_fails: AtomicBool::new(false),
        active: AtomicBool::new(true),
    });
    recover(&*app).unwrap();
    start(&app);
    app
}

fn app() -> Arc<TestApp> {
    app_on(Arc::new(Catalog::open_in_memory().unwrap()), 1)
}

impl TestApp {
    fn run(&self, params: Value) -> JobRecord {
        let id = self.engine.submit(dummy(params)).unwrap().id;
        self.wait(&id)
    }

    fn wait(&self, id: &str) -> JobRecord {
        let t = Instant::now();
        loop {
            let j = self.catalog.job(id).unwrap();
            if j.state.is_final() {
                return j;
            }
            assert!(t.elapsed() < Duration::from_secs(20), "job {id} hangs");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits until job `id`'s log shows `line` (2 s at most: the flush interval and more).
    fn wait_for_line(&self, id: &str, line: &str) {
        let t = Instant::now();
        while !self.messages(id).iter().any(|m| m == line) {
            assert!(
                t.elapsed() < Duration::from_secs(2),
                "{line:?} never showed"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn messages(&self, id: &str) -> Vec<String> {
        let events = self.catalog.events(id).unwrap();
        events.into_iter().map(|e| e.message).collect()
    }
}

#[test]
fn jobs_run_in_submission_order_one_at_a_time() {
    let app = app();
    let ids: Vec<_> = (0..5)
        .map(|i| {
            let p = json!({ "name": i.to_string(), "log": 3 });
            app.engine.submit(dummy(p)).unwrap().id
        })
        .collect();
    for id in &ids {
        assert_eq!(app.wait(id).state, JobState::Succeeded);
    }
    assert_eq!(*app.ran.lock().unwrap(), ["0", "1", "2", "3", "4"]);
    let j = app.catalog.job(&ids[4]).unwrap();
    assert_eq!(j.result, Some(named("4")));
}

#[test]
fn an_unknown_kind_and_a_busy_vm_are_refused() {
    let app = app();
    let e = app
        .engine
        .submit(JobSpec {
            kind: "nope".into(),
            params: JobKind::Index {
                backup: "{}".into(),
            },
            vms: vec![],
        })
        .unwrap_err();
    assert!(e.to_string().contains("no flow runs nope jobs"), "{e}");
    let first = app
        .engine
        .submit(dummy(json!({ "vms": ["vm1"], "until_cancel": true })))
        .unwrap();
    let e = app
        .engine
        .submit(dummy(json!({ "vms": ["vm2", "vm1"] })))
        .unwrap_err();
    assert!(matches!(e, ServerError::Conflict(_)), "{e}");
    assert!(
        e.to_string().contains("VM vm1 is busy with dummy job"),
        "{e}"
    );
    app.engine.cancel(&first.id).unwrap();
    assert_eq!(app.wait(&first.id).state, JobState::Cancelled);
    // Finished: the VM is free again.
    let j = app.run(json!({ "vms": ["vm1"] }));
    assert_eq!(j.state, JobState::Succeeded);
}

#[test]
fn cancel_stops_the_job_at_its_next_step_and_releases_its_holds() {
    let app = app();
    let j = app
        .engine
        .submit(dummy(json!({ "hold": ["s1"], "until_cancel": true })))
        .unwrap();
    app.wait_for_line(&j.id, "waiting");
    assert_eq!(app.catalog.job(&j.id).unwrap().holds, [snap("s1")]);
    app.engine.cancel(&j.id).unwrap();
    let done = app.wait(&j.id);
    assert_eq!(done.state, JobState::Cancelled);
    assert_eq!(done.error.as_deref(), Some("cancelled"));
    assert!(done.holds.is_empty());
    assert_eq!(*app.released.lock().unwrap(), [snap("s1")]);
    let m = app.messages(&j.id);
    assert!(m.iter().any(|m| m == "cancel requested"), "{m:?}");
    assert_eq!(m.last().map(String::as_str), Some("cancelled"));
    // A finished job cannot be cancelled.
    assert!(matches!(
        app.engine.cancel(&j.id),
        Err(ServerError::Conflict(_))
    ));
}

#[test]
fn a_failing_or_panicking_flow_releases_its_holds_and_its_log_is_complete() {
    let app = app();
    let j = app.run(json!({ "log": 10, "hold": ["s1", "s2"], "fail": "boom" }));
    assert_eq!(j.state, JobState::Failed);
    assert_eq!(j.error.as_deref(), Some("boom"));
    assert!(j.holds.is_empty());
    assert_eq!(*app.released.lock().unwrap(), [snap("s1"), snap("s2")]);
    // Every line is there the moment the job is final, the error last.
    let m = app.messages(&j.id);
    assert_eq!(m.len(), 2 + 10 + 2 + 1, "{m:?}");
    assert_eq!(m[..2], ["queued", "started"]);
    assert_eq!(
        m[2..12],
        (0..10).map(|i| format!("line {i}")).collect::<Vec<_>>()
    );
    assert_eq!(
        m[12..],
        ["released snapshot s1", "released snapshot s2", "boom"]
    );

    let j = app.run(json!({ "hold": ["s3"], "panic": true }));
    assert_eq!(j.state, JobState::Failed);
    assert!(
        j.error
            .as_deref()
            .unwrap()
            .contains("the dummy flow panicked: dummy panics")
    );
    assert!(j.holds.is_empty());
    assert!(app.released.lock().unwrap().contains(&snap("s3")));
    // The worker survived.
    assert_eq!(app.run(json!({})).state, JobState::Succeeded);
}

#[test]
fn holds_that_cannot_be_released_stay_recorded_until_they_can() {
    let app = app();
    app.release_fails.store(true, Ordering::SeqCst);
    let j = app.run(json!({ "hold": ["s1"], "fail": "boom" }));
    assert_eq!(j.state, JobState::Failed);
    assert_eq!(j.holds, [snap("s1")]);
    assert!(
        app.messages(&j.id)
            .iter()
            .any(|m| m.contains("could not release snapshot s1"))
    );
    app.release_fails.store(false, Ordering::SeqCst);
    release_leftovers(&*app);
    assert!(app.catalog.job(&j.id).unwrap().holds.is_empty());
    release_leftovers(&*app);
    assert_eq!(*app.released.lock().unwrap(), [snap("s1")], "released once");
    let m = app.messages(&j.id);
    assert!(
        m.iter()
            .any(|m| m == "released snapshot s1 after the job ended"),
        "{m:?}"
    );
}

#[test]
fn log_lines_are_written_in_batches_and_visible_while_the_job_runs() {
    let app = app();
    let (writes, lines) = app.engine.event_writes();
    let j = app.run(json!({ "log": 1000 }));
    assert_eq!(j.state, JobState::Succeeded);
    assert_eq!(app.messages(&j.id).len(), 1003);
    let (writes, lines) = (
        app.engine.event_writes().0 - writes,
        app.engine.event_writes().1 - lines,
    );
    assert_eq!(lines, 1003);
    // One write per MAX_PENDING lines, plus queued, the end and perhaps a timer flush.
    assert!(
        writes <= 1000 / super::events::MAX_PENDING as u64 + 4,
        "{writes} writes"
    );

    // A line logged before a long call (no step boundary after it) shows while the call
    // runs, within the flush interval.
    let j = app
        .engine
        .submit(dummy(json!({ "log": 1, "sleep_ms": 1500 })))
        .unwrap();
    app.wait_for_line(&j.id, "line 0");
    assert_eq!(
        app.catalog.job(&j.id).unwrap().state,
        JobState::Running,
        "shown before the job ended"
    );
    assert_eq!(app.wait(&j.id).state, JobState::Succeeded);
}

#[test]
fn a_flow_submits_follow_up_jobs_through_its_context() {
    let app = app();
    let j = app.run(json!({ "name": "first", "follow_up": "second" }));
    assert_eq!(j.state, JobState::Succeeded);
    let all = app.catalog.jobs(10).unwrap();
    let second = all.iter().find(|x| x.id != j.id).unwrap();
    assert_eq!(app.wait(&second.id).state, JobState::Succeeded);
    assert_eq!(*app.ran.lock().unwrap(), ["first", "second"]);
}

#[test]
fn a_restart_fails_the_running_job_releases_its_holds_and_queues_the_queued_again() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("catalog.db");
    let catalog = Arc::new(Catalog::open(&path).unwrap());
    let record = |id: &str, state, holds| JobRecord {
        id: id.parse().unwrap(),
        kind: "dummy".into(),
        state,
        params: JobKind::Index {
            backup: json!({ "name": id }).to_string(),
        },
        vms: vec![],
        created_ms: 1,
        started_ms: None,
        finished_ms: None,
        error: None,
        result: None,
        holds,
        cancel_requested: false,
        events: None,
    };
    let died = "aaaa000000000001";
    let waiting = "bbbb000000000002";
    catalog
        .insert_job(&record(
            died,
            JobState::Running,
            vec![snap("s1"), snap("s2")],
        ))
        .unwrap();
    catalog
        .insert_job(&record(waiting, JobState::Queued, vec![]))
        .unwrap();
    drop(catalog);
    let app = app_on(Arc::new(Catalog::open(&path).unwrap()), 2);
    let j = app.catalog.job(died).unwrap();
    assert_eq!(j.state, JobState::Failed);
    assert!(j.holds.is_empty());
    assert_eq!(*app.released.lock().unwrap(), [snap("s1"), snap("s2")]);
    let m = app.messages(died);
    assert!(
        m.iter()
            .any(|m| m.contains("the server stopped while the job ran")),
        "{m:?}"
    );
    assert_eq!(app.wait(waiting).state, JobState::Succeeded);
    assert_eq!(*app.ran.lock().unwrap(), [waiting]);
}

#[test]
fn a_cancelled_queued_job_never_runs() {
    let app = app();
    let busy = app
        .engine
        .submit(dummy(json!({ "name": "busy", "until_cancel": true })))
        .unwrap();
    let queued = app
        .engine
        .submit(dummy(json!({ "name": "queued" })))
        .unwrap();
    app.wait_for_line(&busy.id, "waiting");
    app.engine.cancel(&queued.id).unwrap();
    app.engine.cancel(&busy.id).unwrap();
    assert_eq!(app.wait(&busy.id).state, JobState::Cancelled);
    assert_eq!(app.wait(&queued.id).state, JobState::Cancelled);
    assert_eq!(*app.ran.lock().unwrap(), ["busy"]);
}

#[test]
fn a_batch_that_keeps_failing_is_written_line_by_line_and_the_good_lines_stay() {
    let catalog = Arc::new(Catalog::open_in_memory().unwrap());
    let app = app_on(catalog.clone(), 1);
    let good = app.run(json!({})).id;
    let log = super::events::EventLog::new(catalog.clone());
    log.push(&good, "info", "kept");
    log.push("ffff00000000dead", "info", "of no job");
    for _ in 1..super::events::GIVE_UP_AFTER {
        assert!(log.flush().is_err());
        assert!(!app.messages(&good).contains(&"kept".to_string()));
    }
    assert!(log.flush().is_err(), "the last batch attempt fails too");
    assert_eq!(app.messages(&good).last().map(String::as_str), Some("kept"));
    log.flush().unwrap();
    assert!(catalog.events("ffff00000000dead").unwrap().is_empty());
}

#[test]
fn an_inactive_app_starts_no_job_and_its_running_flow_stops_at_its_next_step() {
    let app = app();
    let busy = app
        .engine
        .submit(dummy(
            json!({ "name": "busy", "hold": ["s1"], "until_cancel": true }),
        ))
        .unwrap();
    app.wait_for_line(&busy.id, "waiting");
    // A server that lost its leader lease.
    app.active.store(false, Ordering::SeqCst);
    let queued = app
        .engine
        .submit(dummy(json!({ "name": "queued" })))
        .unwrap();
    let j = app.wait(&busy.id);
    assert_eq!(j.state, JobState::Failed);
    assert!(
        j.error.as_deref().unwrap().contains("leader lease lost"),
        "{j:?}"
    );
    assert_eq!(*app.released.lock().unwrap(), [snap("s1")]);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(app.catalog.job(&queued.id).unwrap().state, JobState::Queued);
    assert_eq!(*app.ran.lock().unwrap(), ["busy"]);
    // Active again: recovery queues the job again, and it runs.
    app.active.store(true, Ordering::SeqCst);
    recover(&*app).unwrap();
    assert_eq!(app.wait(&queued.id).state, JobState::Succeeded);
    assert_eq!(*app.ran.lock().unwrap(), ["busy", "queued"]);
}

#[test]
fn recovery_leaves_the_jobs_this_process_runs_alone() {
    let app = app();
    let busy = app
        .engine
        .submit(dummy(
            json!({ "name": "busy", "hold": ["s1"], "until_cancel": true }),
        ))
        .unwrap();
    app.wait_for_line(&busy.id, "waiting");
    // What a server that becomes active again runs.
    recover(&*app).unwrap();
    assert_eq!(app.catalog.job(&busy.id).unwrap().state, JobState::Running);
    assert!(app.released.lock().unwrap().is_empty());
    app.engine.cancel(&busy.id).unwrap();
    assert_eq!(app.wait(&busy.id).state, JobState::Cancelled);
    assert_eq!(*app.ran.lock().unwrap(), ["busy"], "it ran once");
}
