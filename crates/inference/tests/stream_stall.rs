//! Streaming clients that stop reading hold a generation slot for a bounded time only:
//! two streamed answers that nobody reads (their bodies are never polled, as with a
//! client that stopped reading once the socket buffers filled) take both slots, and a
//! third request is answered once they have stalled for 15 s, not when they would have
//! finished. The real demo model, through the real router.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::response::Response;
use slmesh_inference::http::{router, HttpLimits, HttpState};
use slmesh_inference::{Engine, ModelSpec};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tower::ServiceExt;

async fn post(app: &axum::Router, body: String) -> Response {
    let request = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(Body::from(body))
        .expect("request");
    app.clone().oneshot(request).await.expect("infallible")
}

fn chat(stream: bool, max_tokens: u32, prompt: &str) -> String {
    serde_json::json!({
        "model": "smollm2", "stream": stream, "max_tokens": max_tokens, "temperature": 0,
        "messages": [{"role": "user", "content": prompt}],
    })
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_streams_nobody_reads_free_their_slots_after_the_stall_timeout() {
    let engine = Arc::new(Engine::new());
    let spec = ModelSpec { name: "smollm2".into(), version: 1, gguf: slmesh_e2e::demo_model() };
    engine.activate(spec).await.expect("load the demo model");
    let limits = HttpLimits { max_concurrent: 2, max_waiting: 0, ..HttpLimits::default() };
    let app = router(HttpState::new(engine, limits, None));

    // Long answers: both would generate for far longer than the stall timeout.
    let story = "Write a very long story about a lighthouse keeper and the sea, in many chapters.";
    let held: Vec<Response> =
        vec![post(&app, chat(true, 2000, story)).await, post(&app, chat(true, 2000, story)).await];
    assert!(held.iter().all(|r| r.status() == StatusCode::OK));
    let stalled_since = Instant::now();
    let third = || post(&app, chat(false, 4, "Hi"));
    assert_eq!(third().await.status(), StatusCode::TOO_MANY_REQUESTS, "the two unread streams hold both slots");
    let answered = loop {
        let status = third().await.status();
        if status == StatusCode::OK {
            break stalled_since.elapsed();
        }
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert!(stalled_since.elapsed() < Duration::from_secs(60), "the unread streams never let go of their slots");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    eprintln!("third request answered {:.1} s after the two streams stopped being read", answered.as_secs_f64());
    // 15 s of stall after their buffered events (32 each) filled, plus the time to
    // generate those (13 to 14 s here on a busy machine); the answers themselves (2,000
    // tokens) would take minutes. Under two stall timeouts: the closing `[DONE]` does
    // not wait out a second stall (34 to 36 s before that fix).
    assert!(answered < Duration::from_secs(30), "slots freed only after {answered:?}");
    // The unread streams ended: reading them now gives their buffered events, no [DONE].
    for response in held {
        let body = axum::body::to_bytes(response.into_body(), usize::MAX).await.expect("body");
        let text = String::from_utf8_lossy(&body);
        assert!(text.contains("data: ") && !text.contains("[DONE]"), "{text}");
    }
}
