use super::*;
use slmesh_protocol::hex32::Hex32;
use slmesh_protocol::identity::{KeyKind, SecretKey};
use slmesh_protocol::manifest::{
    verify_manifest, FileEntry, FileRole, InferenceDefaults, ModelFormat, ModelManifest, Variant, VerifiedManifest,
};
use slmesh_protocol::rollout::{RolloutPlan, TagSelector};
use slmesh_protocol::TrustStore;

fn publisher() -> (SecretKey, TrustStore) {
    let key = SecretKey::from_seed(KeyKind::Publisher, [3; 32]);
    let mut trust = TrustStore::new();
    trust.add("release", key.public()).unwrap();
    (key, trust)
}

fn verified(name: &str, version: u64) -> VerifiedManifest {
    let (key, trust) = publisher();
    let m = ModelManifest {
        name: name.into(),
        version,
        created_at: 1,
        description: String::new(),
        variants: vec![Variant {
            id: "q4_1".into(),
            format: ModelFormat::Gguf,
            quantization: "Q4_1".into(),
            architecture: "llama".into(),
            cpu_archs: vec![],
            min_ram_bytes: 1,
            selector: TagSelector::default(),
            files: vec![FileEntry { role: FileRole::Weights, name: "m.gguf".into(), blake3: Hex32([1; 32]), size: 10 }],
        }],
        inference: InferenceDefaults::default(),
        rollout: RolloutPlan::default(),
        fleet: "default".into(),
        eval: None,
    };
    let bytes = SignedManifest::sign(&m, &key).unwrap().to_bytes().unwrap();
    verify_manifest(&bytes, &trust, |_| None).unwrap()
}

/// Records version `v` as the node does when it accepts a manifest: the manifest first,
/// then the model state naming the version, then its record; each write flushed.
fn accept(store: &Store, v: u64) -> ModelState {
    let m = verified("m", v);
    store.put_signed_manifest("m", v, &m.signed).unwrap();
    store.flush().unwrap();
    let mut state = store.model("m").unwrap().unwrap_or_default();
    state.latest_known = v;
    store.put_model("m", &state).unwrap();
    store.flush().unwrap();
    store.put_version("m", v, &VersionRecord::new(v)).unwrap();
    store.flush().unwrap();
    state
}

#[test]
fn state_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path()).unwrap();
        let mut state = accept(&store, 4);
        state.staged.insert(4);
        store.put_model("m", &state).unwrap();
        store.set_pin("m", Some(4)).unwrap();
        let peer = PeerRecord {
            node: SecretKey::generate(KeyKind::Node).public(),
            addrs: vec!["/ip4/127.0.0.1/tcp/4001".into()],
            tags: [("site".to_string(), "a".to_string())].into(),
            last_seen: 9,
            rtt_micros: Some(300),
        };
        store.upsert_peer(&peer).unwrap();
        store.flush().unwrap();
    }
    let store = Store::open(dir.path()).unwrap();
    let s = store.model("m").unwrap().unwrap();
    assert_eq!((s.latest_known, s.pinned, s.staged.len()), (4, Some(4), 1));
    assert_eq!(store.peers().unwrap().len(), 1);
    assert_eq!(store.models().unwrap().len(), 1);
    assert_eq!(store.manifest("m", 4).unwrap().unwrap(), verified("m", 4).signed);
    assert_eq!(store.manifest_versions().unwrap(), vec![("m".to_string(), 4)]);
}

#[test]
fn other_schema_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path()).unwrap();
        store.meta.insert(SCHEMA_KEY, &99u32.to_le_bytes()).unwrap();
        store.flush().unwrap();
    }
    let err = Store::open(dir.path()).err().unwrap();
    assert!(matches!(err, StoreError::SchemaMismatch { found: 99, expected: SCHEMA_VERSION, .. }), "{err}");
}

#[test]
fn a_store_in_use_is_refused_with_a_clear_error_and_reopens_once_closed() {
    let dir = tempfile::tempdir().unwrap();
    let first = Store::open(dir.path()).unwrap();
    let err = Store::open(dir.path()).err().unwrap();
    assert!(matches!(err, StoreError::Locked { .. }), "{err}");
    assert!(err.to_string().contains("another slmesh node"), "{err}");
    drop(first);
    // At once: sled lets go of the lock from a background thread a moment later.
    Store::open(dir.path()).expect("the lock goes with the last handle");
}

#[test]
fn damaged_values_are_reported_not_panicked_on() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store.models.insert(b"m", &b"\xff\xff garbage"[..]).unwrap();
    assert!(matches!(store.model("m"), Err(StoreError::Corrupt { .. })));
    assert!(matches!(store.models(), Err(StoreError::Corrupt { .. })));
    assert!(matches!(store.set_pin("m", Some(1)), Err(StoreError::Corrupt { .. })));
    store.versions.insert(b"m\0\0\0\0\0\0\0\0\x01", &b"\x01"[..]).unwrap();
    assert!(matches!(store.versions(), Err(StoreError::Corrupt { .. })));
}

const CHILD_ENV: &str = "SLMESH_STORE_CRASH_CHILD";

/// Run in a child process by `kill_9_leaves_consistent_state`: churns through versions
/// until it is killed.
#[test]
#[ignore = "a helper: kill_9_leaves_consistent_state runs it in a child process"]
fn crash_child() {
    let Ok(path) = std::env::var(CHILD_ENV) else { return };
    let store = Store::open(Path::new(&path)).unwrap();
    let start = store.model("m").unwrap().map_or(0, |m| m.latest_known) + 1;
    // The node's writes for each version: accepted, staged, activated (the old active
    // becoming the previous), and now and then rolled back.
    for v in start.. {
        let mut state = accept(&store, v);
        state.staged.insert(v);
        store.put_model("m", &state).unwrap();
        store.flush().unwrap();
        state.previous = state.active;
        state.active = Some(v);
        store.put_model("m", &state).unwrap();
        store.flush().unwrap();
        if v % 3 == 0 {
            state.active = state.previous.take();
            store.put_model("m", &state).unwrap();
            store.flush().unwrap();
        }
    }
}

#[test]
fn kill_9_leaves_consistent_state() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut last = 0;
    for round in 0..4 {
        let mut child = std::process::Command::new(&exe)
            .args(["--exact", "tests::crash_child", "--ignored", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(400 + 150 * round));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();

        let store = Store::open(dir.path()).unwrap();
        let s = store.model("m").unwrap().unwrap_or_default();
        // Every version a state names has its manifest; what is active was staged;
        // previous is older than active; nothing goes backwards across crashes.
        assert!(s.latest_known >= last, "round {round}: {} < {last}", s.latest_known);
        last = s.latest_known;
        for v in s.staged.iter().chain(s.active.iter()).chain(s.previous.iter()) {
            assert!(store.manifest("m", *v).unwrap().is_some(), "round {round}: no manifest for {v}");
            assert!(*v <= s.latest_known);
        }
        if let Some(a) = s.active {
            assert!(s.staged.contains(&a));
        }
        for v in 1..=s.latest_known {
            assert!(store.manifest("m", v).unwrap().is_some(), "round {round}: no manifest for {v}");
        }
        if let (Some(a), Some(p)) = (s.active, s.previous) {
            assert!(p < a, "round {round}: previous {p} not older than active {a}");
        }
    }
    assert!(last > 0, "the child never committed anything");
}

#[test]
fn the_state_machines_records_survive_reopen() {
    use slmesh_protocol::fleet::{CommandAction, RolloutCommand};
    let dir = tempfile::tempdir().unwrap();
    let (key, _) = publisher();
    let command = SignedCommand::sign(
        &RolloutCommand {
            model: "m".into(),
            version: 4,
            action: CommandAction::Pause,
            issued_at: 7,
            fleet: "default".into(),
        },
        &key,
    )
    .unwrap();
    let mut record = VersionRecord::new(100);
    record.opened = vec![100, 160];
    record.activation_failures = 2;
    {
        let store = Store::open(dir.path()).unwrap();
        let m = verified("m", 4);
        store.put_signed_manifest("m", 4, &m.signed).unwrap();
        let state = ModelState { latest_known: 4, active: Some(4), ..Default::default() };
        store.put_model("m", &state).unwrap();
        store.put_version("m", 4, &record).unwrap();
        store.put_command(&command).unwrap();
        store.put_command(&command).unwrap();
        store.flush().unwrap();
    }
    let store = Store::open(dir.path()).unwrap();
    let (manifests, bad) = store.manifests().unwrap();
    assert_eq!((manifests.len(), bad.len()), (1, 0));
    assert_eq!(store.model("m").unwrap().unwrap().active, Some(4));
    assert_eq!(store.versions().unwrap(), vec![(("m".to_string(), 4), record)]);
    assert_eq!(store.commands().unwrap(), vec![command], "a command stored twice is held once");
}

#[test]
fn published_blobs_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path()).unwrap();
        assert!(store.originated().unwrap().is_empty());
        store.put_originated(&[Hex32([4; 32])]).unwrap();
        store.flush().unwrap();
    }
    assert_eq!(Store::open(dir.path()).unwrap().originated().unwrap(), vec![Hex32([4; 32])]);
}

#[test]
fn the_history_keeps_the_newest_events_in_order_across_a_reopen_and_skips_unreadable_ones() {
    use slmesh_protocol::history::{HistoryEvent, HistoryKind, MAX_EVENTS};
    let dir = tempfile::tempdir().unwrap();
    let event = |k: usize| HistoryEvent {
        at: k as u64,
        model: "m".into(),
        version: 2,
        kind: HistoryKind::WaveOpened { wave: 1, waves: 3 },
        text: format!("event {k}"),
    };
    {
        let store = Store::open(dir.path()).unwrap();
        for k in 0..MAX_EVENTS + 5 {
            store.put_event(&event(k)).unwrap();
        }
        // What another version of slmesh may have written.
        store.events.insert(u64::MAX.to_be_bytes(), &b"\xff\xfe"[..]).unwrap();
        store.flush().unwrap();
    }
    let store = Store::open(dir.path()).unwrap();
    let (events, unreadable) = store.events().unwrap();
    assert_eq!(unreadable, 1);
    assert_eq!(events.len(), MAX_EVENTS, "the oldest went when the cap was passed");
    assert_eq!(events.first().map(|e| e.at), Some(5));
    assert_eq!(events.last(), Some(&event(MAX_EVENTS + 4)));
    // New events go after the ones before the reopen.
    store.put_event(&event(99_999)).unwrap();
    assert_eq!(store.events().unwrap().0.last().map(|e| e.at), Some(99_999));
}
