//! A tiny llama-shaped GGUF with random weights and a 40-token vocabulary, written by the
//! test itself, loads through the real mistral.rs path and generates in seconds: the
//! loading, smoke-test and serving code runs without the 98 MB demo model.

use slmesh_e2e::tiny_llama_gguf;
use slmesh_inference::{Engine, ModelSpec};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_random_llama_loads_and_generates() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    std::fs::write(&path, tiny_llama_gguf(1, 0)).unwrap();
    let started = std::time::Instant::now();
    let engine = Engine::new();
    engine.activate(ModelSpec { name: "tiny".into(), version: 1, gguf: path }).await.unwrap();
    let model = engine.active().unwrap();
    assert_eq!(model.info.architecture, "llama");
    assert_eq!(model.info.quantization, "F32");
    let request = mistralrs::RequestBuilder::from(
        mistralrs::TextMessages::new().add_message(mistralrs::TextMessageRole::User, "hello world"),
    )
    .set_deterministic_sampler()
    .set_sampler_max_len(8);
    let answer = model.chat(request).await.unwrap();
    assert!(answer.usage.completion_tokens > 0);
    assert!(answer.usage.prompt_tokens > 0);
    eprintln!("tiny model: loaded, smoke-tested and answered in {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_inside_mistral_rs_is_a_refusal_not_a_dead_node() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.gguf");
    std::fs::write(&good, tiny_llama_gguf(1, 0)).unwrap();
    let bad = dir.path().join("bad.gguf");
    std::fs::write(&bad, tiny_llama_gguf(9999, 0)).unwrap();
    let engine = Engine::new();
    engine.activate(ModelSpec { name: "tiny".into(), version: 1, gguf: good }).await.unwrap();
    let err = engine.activate(ModelSpec { name: "tiny".into(), version: 2, gguf: bad }).await.unwrap_err();
    assert!(err.to_string().contains("could not load"), "{err}");
    assert_eq!(engine.active().unwrap().spec.version, 1, "version 1 stopped serving");
}
