//! `slmesh serve` as a real process with the demo model: answers, and bad input that
//! gets a 4xx JSON error while the node keeps serving.

use slmesh_e2e::serve::{serve_demo, Served};
use slmesh_e2e::{http, http_as, post_json};
use std::process::Command;

fn start(extra: &[&str]) -> Served {
    serve_demo(env!("CARGO_BIN_EXE_slmesh").as_ref(), extra)
}

fn post(addr: &str, body: impl Into<Vec<u8>>) -> (u16, serde_json::Value) {
    post_json(addr, "/v1/chat/completions", body)
}

fn chat_ok(addr: &str) {
    let (status, v) = post(
        addr,
        r#"{"model":"smollm2","messages":[{"role":"user","content":"Say hello."}],"max_tokens":8,"temperature":0}"#,
    );
    assert_eq!(status, 200, "{v}");
    assert!(!v["choices"][0]["message"]["content"].as_str().unwrap_or_default().is_empty(), "{v}");
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap_or(0) > 0, "{v}");
    assert_eq!(v["model"], "smollm2@1");
}

#[test]
fn serves_the_demo_model_and_refuses_bad_input() {
    let node = start(&[]);
    let addr = node.addr.as_str();
    let (status, body) = http(addr, "GET", "/health", &[], vec![]);
    assert_eq!(status, 200, "{body}");
    let (status, body) = http(addr, "GET", "/v1/models", &[], vec![]);
    assert_eq!(status, 200);
    let models: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(models["data"][0]["id"], "smollm2");
    chat_ok(addr);

    let too_big = format!(r#"{{"messages":[{{"role":"user","content":"{}"}}]}}"#, "a".repeat(100 << 20));
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("malformed JSON", b"{\"messages\": [".to_vec(), 400),
        ("missing messages", br#"{"model":"smollm2"}"#.to_vec(), 400),
        ("unknown role", br#"{"messages":[{"role":"wizard","content":"hi"}]}"#.to_vec(), 400),
        ("empty content", br#"{"messages":[{"role":"user","content":"  "}]}"#.to_vec(), 400),
        ("max_tokens 1e9", br#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":1000000000}"#.to_vec(), 400),
        ("max_tokens 1e9 as float", br#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":1e9}"#.to_vec(), 400),
        ("invalid UTF-8", b"{\"messages\":[{\"role\":\"user\",\"content\":\"\xff\xfe\"}]}".to_vec(), 400),
        ("unknown model", br#"{"model":"gpt-9","messages":[{"role":"user","content":"hi"}]}"#.to_vec(), 404),
        ("100 MB body", too_big.into_bytes(), 413),
    ];
    for (what, body, expected) in cases {
        let (status, v) = post(addr, body);
        assert_eq!(status, expected, "{what}: {v}");
        assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: no OpenAI error body: {v}");
        assert_eq!(v["error"]["code"], expected, "{what}");
    }
    // Still serving after all of that.
    chat_ok(addr);

    // Streaming: server-sent events, content in deltas, usage on the last chunk, then [DONE].
    let (status, body) = http(
        addr,
        "POST",
        "/v1/chat/completions",
        &[("Content-Type", "application/json")],
        br#"{"messages":[{"role":"user","content":"Name a colour."}],"max_tokens":6,"temperature":0,"stream":true}"#
            .to_vec(),
    );
    assert_eq!(status, 200, "{body}");
    let events: Vec<&str> = body.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{body}");
    let chunks: Vec<serde_json::Value> =
        events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).expect("chunk JSON")).collect();
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert!(!text.trim().is_empty(), "{body}");
    let usage = &chunks.last().expect("chunks")["usage"];
    assert!(usage["completion_tokens"].as_u64().unwrap_or(0) > 0, "{body}");
    assert!(chunks.iter().all(|c| c["model"] == "smollm2@1"));

    // Metrics: three answered requests (two chats and the stream), the refusals by status.
    let (status, text) = http(addr, "GET", "/metrics", &[], vec![]);
    assert_eq!(status, 200);
    let labels = r#"model="smollm2",version="1""#;
    assert!(text.contains(&format!("slmesh_requests_total{{{labels}}} 3")), "{text}");
    assert!(text.contains(&format!("slmesh_request_errors_total{{{labels}}} 0")), "{text}");
    assert!(text.contains(&format!("slmesh_request_latency_seconds_count{{{labels}}} 3")), "{text}");
    assert!(text.contains(&format!("slmesh_time_to_first_token_seconds_count{{{labels}}} 3")), "{text}");
    assert!(text.contains("slmesh_http_rejected_total{code=\"400\"} 7"), "{text}");
    assert!(text.contains("slmesh_http_rejected_total{code=\"413\"} 1"), "{text}");
    assert!(text.contains(&format!("slmesh_active_model{{{labels}}} 1")), "{text}");

    // Plain completions.
    let (status, v) = post_json(addr, "/v1/completions", r#"{"prompt":"The sky is","max_tokens":5,"temperature":0}"#);
    assert_eq!(status, 200, "{v}");
    assert!(!v["choices"][0]["text"].as_str().unwrap_or_default().is_empty(), "{v}");
    assert_eq!(v["model"], "smollm2@1");
    for bad in [r#"{"prompt":"  "}"#, r#"{"max_tokens":5}"#, r#"{"prompt":"x","max_tokens":0}"#, "[1,2"] {
        let (status, v) = post_json(addr, "/v1/completions", bad);
        assert_eq!(status, 400, "{bad}: {v}");
        assert!(v["error"]["message"].is_string());
    }
}

#[test]
fn openai_parameters_are_honoured_or_refused_by_name() {
    let node = start(&[]);
    let addr = node.addr.as_str();
    let chat = |extra: &str| {
        post(
            addr,
            format!(
                r#"{{"messages":[{{"role":"user","content":"What is the capital of France? Answer in one word."}}],"max_tokens":16{extra}}}"#
            ),
        )
    };
    let (status, v) = chat(r#","temperature":0"#);
    assert_eq!(status, 200, "{v}");
    let full = v["choices"][0]["message"]["content"].as_str().unwrap_or_default().to_string();
    assert!(full.contains("Paris"), "{full}");
    // A stop sequence ends the answer before it.
    let (status, v) = chat(r#","temperature":0,"stop":["Paris"]"#);
    assert_eq!(status, 200, "{v}");
    let stopped = v["choices"][0]["message"]["content"].as_str().unwrap_or_default();
    assert!(!stopped.contains("Paris") && stopped.len() < full.len(), "{stopped:?} against {full:?}");
    // Accepted: n = 1, a text response_format, a seed, penalties, usage options.
    for ok in [
        r#","temperature":0,"n":1,"response_format":{"type":"text"},"seed":7,"user":"u1""#,
        r#","temperature":0.7,"top_p":0.9,"frequency_penalty":0.5,"presence_penalty":0.1"#,
        r#","temperature":0.7,"top_p":0.9,"frequency_penalty":0.5,"seed":-3"#,
    ] {
        let (status, v) = chat(ok);
        assert_eq!(status, 200, "{ok}: {v}");
    }
    let streamed = br#"{"messages":[{"role":"user","content":"Hi"}],"max_tokens":4,"stream":true,"stream_options":{"include_usage":true}}"#;
    let (status, body) =
        http(addr, "POST", "/v1/chat/completions", &[("Content-Type", "application/json")], streamed.to_vec());
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("completion_tokens") && body.contains("[DONE]"), "{body}");
    // Refused by name, not silently ignored.
    for (extra, param) in [
        (r#","n":2"#, "n"),
        (r#","tools":[{"type":"function","function":{"name":"f g"}}]"#, "tools"),
        (r#","tools":[{"type":"function","function":{"name":"f","parameters":[]}}]"#, "tools"),
        (r#","tool_choice":"auto""#, "tool_choice"),
        (r#","tools":[{"type":"function","function":{"name":"f"}}],"tool_choice":"always""#, "tool_choice"),
        (r#","functions":[{"name":"f"}]"#, "functions"),
        (r#","response_format":{"type":"json_schema"}"#, "response_format"),
        (r#","response_format":{"type":"json_schema","json_schema":{"name":"x","schema":7}}"#, "response_format"),
        (r#","response_format":{"type":"xml"}"#, "response_format"),
        (r#","logprobs":"yes""#, "logprobs"),
        (r#","top_logprobs":2"#, "top_logprobs"),
        (r#","logprobs":true,"top_logprobs":21"#, "top_logprobs"),
        (r#","seed":7.5,"temperature":0.8"#, "seed"),
        (r#","seed":"7","temperature":0.8"#, "seed"),
        (r#","stop":["a","b","c","d","e"]"#, "stop"),
        (r#","stop":[1]"#, "stop"),
        (r#","frequency_penalty":3"#, "frequency_penalty"),
    ] {
        let (status, v) = chat(extra);
        assert_eq!(status, 400, "{extra}: {v}");
        assert_eq!(v["error"]["param"], param, "{extra}: {v}");
        assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    }
    // A schema the engine's grammar compiler refuses is the client's mistake: a 400.
    let (status, v) =
        chat(r#","response_format":{"type":"json_schema","json_schema":{"name":"x","schema":{"type":"frobnicate"}}}"#);
    assert_eq!(status, 400, "{v}");
    assert!(v["error"]["message"].as_str().is_some_and(|m| m.contains("frobnicate")), "{v}");
    let (status, v) = post_json(addr, "/v1/completions", r#"{"prompt":"x","n":3}"#);
    assert_eq!(status, 400, "{v}");
    // The legacy endpoint's logprobs and JSON modes are not done: said so, by name.
    for (extra, param) in
        [(r#","logprobs":2"#, "logprobs"), (r#","response_format":{"type":"json_object"}"#, "response_format")]
    {
        let (status, v) = post_json(addr, "/v1/completions", format!(r#"{{"prompt":"x"{extra}}}"#));
        assert_eq!((status, v["error"]["param"].as_str()), (400, Some(param)), "{v}");
    }
    let (status, body) = http(addr, "GET", "/v1/models/smollm2", &[], vec![]);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""id":"smollm2""#), "{body}");
    let (status, body) = http(addr, "GET", "/v1/models/gpt-9", &[], vec![]);
    assert_eq!(status, 404, "{body}");
    chat_ok(addr);
}

#[test]
fn bearer_token_is_required_when_set() {
    let node = start(&["--bearer-token", "s3cret"]);
    let (status, body) = http(&node.addr, "GET", "/v1/models", &[], vec![]);
    assert_eq!(status, 401, "{body}");
    let (status, _) = http(&node.addr, "GET", "/v1/models", &[("Authorization", "Bearer s3cret")], vec![]);
    assert_eq!(status, 200);
}

#[test]
fn a_web_page_in_the_operators_browser_cannot_use_the_node() {
    let node = start(&["--bearer-token", "s3cret", "--allow-host", "gw-1.lan"]);
    let (addr, port) = (&node.addr, node.addr.rsplit(':').next().unwrap_or_default());
    let auth = ("Authorization", "Bearer s3cret");
    let json = ("Content-Type", "application/json");
    let chat = br#"{"messages":[{"role":"user","content":"Say hello."}],"max_tokens":4,"temperature":0}"#.to_vec();
    // DNS rebinding: the page's own name, pointed at the node, arrives as the Host.
    let (status, body) =
        http_as(addr, &format!("evil.example:{port}"), "POST", "/v1/chat/completions", &[auth, json], chat.clone());
    assert_eq!(status, 421, "{body}");
    assert!(body.contains("allowed_hosts"), "{body}");
    let (status, body) = http_as(addr, &format!("gw-1.lan:{port}"), "GET", "/v1/models", &[auth], vec![]);
    assert_eq!(status, 200, "a name the operator allowed: {body}");
    // A cross-site POST names its page in Origin.
    let page = ("Origin", "http://evil.example");
    let (status, body) = http(addr, "POST", "/v1/chat/completions", &[auth, json, page], chat.clone());
    assert_eq!(status, 403, "{body}");
    let own = format!("http://{addr}");
    let (status, body) = http(addr, "GET", "/v1/models", &[auth, ("Origin", own.as_str())], vec![]);
    assert_eq!(status, 200, "the node's own page: {body}");
    // A form or text/plain body: what a page may send without a CORS preflight.
    for ct in ["text/plain", "application/x-www-form-urlencoded"] {
        let (status, body) = http(addr, "POST", "/v1/chat/completions", &[auth, ("Content-Type", ct)], chat.clone());
        assert_eq!(status, 415, "{ct}: {body}");
    }
    let (status, body) = http(addr, "POST", "/v1/chat/completions", &[auth], chat.clone());
    assert_eq!(status, 415, "no Content-Type: {body}");
    // A guess of the right length is still wrong (compared in constant time).
    let (status, _) = http(addr, "GET", "/v1/models", &[("Authorization", "Bearer s3creT")], vec![]);
    assert_eq!(status, 401);
    let (status, v) = post_json_with(addr, &[auth], chat);
    assert_eq!(status, 200, "{v}");
}

fn post_json_with(addr: &str, headers: &[(&str, &str)], body: Vec<u8>) -> (u16, String) {
    let mut all = vec![("Content-Type", "application/json")];
    all.extend_from_slice(headers);
    http(addr, "POST", "/v1/chat/completions", &all, body)
}

#[test]
fn a_file_that_is_not_a_model_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("photo.gguf");
    std::fs::write(&path, b"\x89PNG\r\n\x1a\n0000000000000000").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_slmesh"))
        .args(["serve", "--model", path.to_str().unwrap(), "--http-bind", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a GGUF file"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_full_queue_answers_429_and_the_node_recovers() {
    let node = start(&["--max-concurrent", "1", "--max-waiting", "1"]);
    let addr = node.addr.clone();
    let long = r#"{"messages":[{"role":"user","content":"Write a long story about a dragon."}],"max_tokens":160,"temperature":0}"#;
    let spawn = |addr: String| std::thread::spawn(move || post(&addr, long).0);
    let generating = spawn(addr.clone());
    std::thread::sleep(std::time::Duration::from_millis(400));
    let waiting = spawn(addr.clone());
    std::thread::sleep(std::time::Duration::from_millis(400));
    let (status, v) = post(&addr, long);
    assert_eq!(status, 429, "{v}");
    assert_eq!(v["error"]["type"], "rate_limit_error");
    assert_eq!(generating.join().unwrap(), 200);
    assert_eq!(waiting.join().unwrap(), 200);
    chat_ok(&addr);
}

#[test]
fn without_a_setting_the_requests_at_once_follow_the_machines_memory() {
    // 4 at once with 8 GiB or more, else 2; none may wait, so each one over gets 429.
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let expected = if kib * 1024 >= slmesh_inference::http::LARGE_MACHINE_RAM_BYTES { 4 } else { 2 };
    let node = start(&["--max-waiting", "0"]);
    // Long enough to be running still when the one over arrives (under a second later).
    let long = r#"{"messages":[{"role":"user","content":"Write a long story about a dragon."}],"max_tokens":96,"temperature":0}"#;
    let running: Vec<_> = (0..expected)
        .map(|_| {
            let addr = node.addr.clone();
            let handle = std::thread::spawn(move || post(&addr, long));
            std::thread::sleep(std::time::Duration::from_millis(150));
            handle
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let (status, v) = post(&node.addr, long);
    assert_eq!(status, 429, "one more than {expected} at once: {v}");
    for r in running {
        let (status, v) = r.join().unwrap();
        assert_eq!(status, 200, "{expected} at once on a machine with {kib} KiB: {v}");
    }
    chat_ok(&node.addr);
}

#[cfg(unix)]
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib =
        status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()?.parse().ok());
    kib.unwrap_or(0.0) / 1024.0
}

#[test]
fn ten_times_the_concurrency_gets_429s_memory_stays_bounded_and_service_recovers() {
    let node = start(&["--max-concurrent", "2", "--max-waiting", "4"]);
    let addr = node.addr.clone();
    chat_ok(&addr);
    let pid = node.child.id();
    let before = rss_mib(pid);
    let body = r#"{"messages":[{"role":"user","content":"Tell me about rivers."}],"max_tokens":32,"temperature":0}"#;
    let clients: Vec<_> = (0..20)
        .map(|_| {
            let addr = addr.clone();
            std::thread::spawn(move || post(&addr, body).0)
        })
        .collect();
    let mut peak = before;
    while !clients.iter().all(|c| c.is_finished()) {
        peak = peak.max(rss_mib(pid));
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let statuses: Vec<u16> = clients.into_iter().map(|c| c.join().expect("client")).collect();
    let (ok, busy) = (statuses.iter().filter(|s| **s == 200).count(), statuses.iter().filter(|s| **s == 429).count());
    assert_eq!(ok + busy, 20, "only 200 or 429: {statuses:?}");
    assert!(ok >= 2 && busy >= 1, "{statuses:?}");
    println!(
        "20 clients at concurrency 2: {ok} answered, {busy} told 429; RSS {before:.0} MiB before, peak {peak:.0} MiB"
    );
    assert!(peak < before + 100.0, "RSS grew from {before:.0} to {peak:.0} MiB under load");
    // Service is back at once.
    chat_ok(&addr);
}

#[test]
fn sigterm_lets_the_request_in_flight_finish_then_stops() {
    let mut node = start(&[]);
    let addr = node.addr.clone();
    let in_flight = std::thread::spawn(move || {
        post(
            &addr,
            r#"{"messages":[{"role":"user","content":"Tell me about rivers."}],"max_tokens":64,"temperature":0}"#,
        )
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    let pid = node.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let (status, v) = in_flight.join().unwrap();
    assert_eq!(status, 200, "{v}");
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap_or(0) > 0);
    let exit = node.child.wait().unwrap();
    assert!(exit.success(), "slmesh serve exited with {exit}");
}

/// Threads of a process (`/proc/PID/status`).
fn thread_count(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("Threads:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

#[test]
fn the_engine_computes_on_the_threads_it_is_given() {
    // The engine's thread pools are the only parts whose size follows --threads.
    let counts: Vec<u64> = ["1", "2"]
        .iter()
        .map(|n| {
            let node = start(&["--threads", n]);
            chat_ok(&node.addr);
            thread_count(node.child.id())
        })
        .collect();
    assert!(counts[0] < counts[1], "threads with --threads 1 and 2: {counts:?}");
    let out = Command::new(env!("CARGO_BIN_EXE_slmesh"))
        .args(["serve", "--threads", "0", "--model", "any.gguf"])
        .output()
        .expect("run slmesh");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && said.contains("--threads"), "{said}");
}

#[test]
fn one_thread_answers_requests_decoded_together() {
    // A gateway with one core: the engine computes on its own thread alone. Two or more
    // sequences decoded together once stopped it for good (every request then timed
    // out): their sampling waited for another thread of the engine's pool.
    let node = start(&["--threads", "1", "--max-concurrent", "4"]);
    let body = r#"{"messages":[{"role":"user","content":"Write a story about a lighthouse."}],"max_tokens":24,"temperature":0}"#;
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let addr = node.addr.clone();
            std::thread::spawn(move || post(&addr, body))
        })
        .collect();
    for c in clients {
        let (status, v) = c.join().unwrap();
        assert_eq!(status, 200, "four at once on one thread: {v}");
        assert!(v["usage"]["completion_tokens"].as_u64().unwrap_or(0) > 0, "{v}");
    }
    chat_ok(&node.addr);
}

/// One short conversation of its own (`i`) after a shared system prompt.
fn converse(addr: &str, system: &str, i: usize) {
    let body = serde_json::json!({
        "messages": [{"role": "system", "content": system},
                     {"role": "user", "content": format!("Conversation {i}: name {i} things that are blue.")}],
        "max_tokens": 4, "temperature": 0
    });
    let (status, v) = post(addr, body.to_string());
    assert_eq!(status, 200, "{v}");
}

#[test]
fn the_prefix_cache_holds_as_many_conversations_as_it_is_told() {
    // Four conversations of about 170 tokens each: kept, their attention caches take
    // several MiB each; with --prefix-cache 0 nothing is kept.
    let system = "You are a helpful assistant who answers every question in detail. ".repeat(14);
    let growth: Vec<f64> = ["0", "4"]
        .iter()
        .map(|n| {
            let node = start(&["--prefix-cache", n]);
            converse(&node.addr, &system, 0);
            let before = rss_mib(node.child.id());
            (1..5).for_each(|i| converse(&node.addr, &system, i));
            rss_mib(node.child.id()) - before
        })
        .collect();
    eprintln!("memory grown over 4 conversations with --prefix-cache 0 and 4: {growth:?} MiB");
    assert!(growth[0] < 4.0, "memory grew by {:.1} MiB with --prefix-cache 0", growth[0]);
    assert!(growth[1] > growth[0] + 4.0, "memory grew by {growth:?} MiB with --prefix-cache 0 and 4");
}

#[test]
fn memory_stays_flat_over_many_different_conversations() {
    // mistral.rs 0.8.1 kept the attention cache of every finished conversation on a
    // CPU-only machine (crates/vendor/README.md): now `--prefix-cache` (4 by default) are
    // kept, then the oldest go.
    let node = start(&[]);
    let pid = node.child.id();
    let system = "You are a helpful assistant who answers every question in detail. ".repeat(6);
    let converse = |i: usize| converse(&node.addr, &system, i);
    // Enough to fill the cache, then as many again.
    (0..20).for_each(converse);
    let full = rss_mib(pid);
    (20..40).for_each(converse);
    let after = rss_mib(pid);
    assert!(after - full < 30.0, "resident memory grew from {full:.0} to {after:.0} MiB over 20 more conversations");
}

#[test]
fn a_conversation_never_outgrows_the_context_it_is_given() {
    // 96 tokens of context: a prompt longer than that is refused by name, and an answer
    // stops where prompt and answer fill it.
    let node = start(&["--context-length", "96"]);
    let long = serde_json::json!({
        "messages": [{"role": "user", "content": "Tell me about the sea. ".repeat(40)}], "max_tokens": 8
    });
    let (status, v) = post(&node.addr, long.to_string());
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["param"], "messages", "{v}");
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("context of 96 tokens"), "{v}");
    // Streamed, the same 400 before any event; neither counts against the version.
    let mut streamed = long.clone();
    streamed["stream"] = serde_json::json!(true);
    let (status, v) = post(&node.addr, streamed.to_string());
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["param"], "messages", "{v}");
    let (_, metrics) = slmesh_e2e::http(&node.addr, "GET", "/metrics", &[], vec![]);
    assert!(metrics.contains("slmesh_http_rejected_total{code=\"400\"} 2"), "{metrics}");
    assert!(!metrics.contains("slmesh_request_errors_total{model=\"smollm2\",version=\"1\"} 1"), "{metrics}");
    let short = serde_json::json!({
        "messages": [{"role": "user", "content": "Write a long story about a dragon."}],
        "max_tokens": 500, "temperature": 0
    });
    let (status, v) = post(&node.addr, short.to_string());
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
    let used = v["usage"]["total_tokens"].as_u64().unwrap_or(0);
    assert!((80..=96).contains(&used), "prompt and answer took {used} tokens of 96: {v}");
    // The same request with the file's own context (8,192) runs past 96.
    let node = start(&["--context-length", "0"]);
    let (status, v) = post(&node.addr, short.to_string());
    assert_eq!(status, 200, "{v}");
    assert!(v["usage"]["total_tokens"].as_u64().unwrap_or(0) > 96, "{v}");
}
