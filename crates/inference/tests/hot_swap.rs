//! Hot swap under concurrent HTTP requests: no request fails, and every request that
//! starts after the swap is answered by the new version.

use slmesh_e2e::{demo_model, post_json};
use slmesh_inference::http::{self, HttpLimits, HttpState};
use slmesh_inference::{Engine, ModelSpec};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

struct Outcome {
    started: Instant,
    status: u16,
    model: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swap_under_load_drops_nothing() {
    let gguf = demo_model();
    let engine = Arc::new(Engine::new());
    engine.activate(ModelSpec { name: "smollm2".into(), version: 1, gguf: gguf.clone() }).await.unwrap();
    let limits = HttpLimits { max_concurrent: 2, max_waiting: 64, ..HttpLimits::default() };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (stop_server, stopped) = tokio::sync::oneshot::channel::<()>();
    let server =
        tokio::spawn(http::serve(listener, HttpState::new(engine.clone(), limits, None), Default::default(), async {
            let _ = stopped.await;
        }));

    let stop = Arc::new(AtomicBool::new(false));
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..4)
        .map(|i| {
            let (addr, stop, outcomes) = (addr.clone(), stop.clone(), outcomes.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let started = Instant::now();
                    let body = format!(
                        r#"{{"messages":[{{"role":"user","content":"Client {i}: say something."}}],"max_tokens":4,"temperature":0}}"#
                    );
                    let (status, v) = post_json(&addr, "/v1/chat/completions", body);
                    let model = v["model"].as_str().unwrap_or_default().to_string();
                    outcomes.lock().unwrap().push(Outcome { started, status, model });
                }
            })
        })
        .collect();

    // Let some requests finish on version 1, then swap while the clients keep going.
    while outcomes.lock().unwrap().len() < 4 {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    engine.activate(ModelSpec { name: "smollm2".into(), version: 2, gguf }).await.unwrap();
    let swapped = Instant::now();
    let before = outcomes.lock().unwrap().len();
    while outcomes.lock().unwrap().len() < before + 8 {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        tokio::task::spawn_blocking(move || c.join().unwrap()).await.unwrap();
    }
    let _ = stop_server.send(());
    server.await.unwrap().unwrap();

    let outcomes = outcomes.lock().unwrap();
    assert!(outcomes.iter().all(|o| o.status == 200), "a request failed during the swap");
    assert!(outcomes.iter().any(|o| o.model == "smollm2@1"));
    let after: Vec<_> = outcomes.iter().filter(|o| o.started > swapped).collect();
    assert!(after.len() >= 4, "too few requests after the swap");
    assert!(after.iter().all(|o| o.model == "smollm2@2"), "a request after the swap was answered by version 1");
}
