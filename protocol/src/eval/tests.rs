use super::*;

const SUITE: &str = r#"# a comment, then a blank line

{"name": "capital", "prompt": "What is the capital of France?", "contains_any": ["Paris"]}
{"prompt": "Give a JSON object with a key ok.", "json_schema": {"type": "object", "required": ["ok"]}, "max_tokens": 48}
{"name": "sum", "prompt": "2 + 2?", "regex": "\\b4\\b", "max_chars": 10, "exact": "4", "min_score": 0.5}
"#;

fn suite() -> EvalSuite {
    EvalSuite::parse_jsonl(SUITE).expect("suite")
}

#[test]
fn a_suite_file_reads_with_defaults_and_validates() {
    let s = suite();
    assert_eq!(s.cases.len(), 3);
    assert_eq!(s.cases[0].name, "capital");
    assert_eq!(s.cases[1].name, "line 4");
    assert_eq!(s.cases[0].max_tokens, DEFAULT_CASE_TOKENS);
    assert_eq!(s.cases[1].max_tokens, 48);
    assert_eq!(s.cases[0].min_score, 1.0);
    assert_eq!(s.cases[2].check_count(), 3);
    s.validate().expect("valid");
}

#[test]
fn each_bad_line_is_refused_with_its_line_number() {
    let bad = [
        ("{\"prompt\": \"x\", \"exact\": \"y\"", "not a case"),
        ("{\"prompt\": \"x\", \"exactly\": \"y\"}", "unknown field"),
        ("{\"prompt\": \"x\"}", "no check"),
        ("{\"prompt\": \"  \", \"exact\": \"y\"}", "prompt must be"),
        ("{\"prompt\": \"x\", \"regex\": \"(\"}", "does not compile"),
        ("{\"prompt\": \"x\", \"json_schema\": {\"type\": 12}}", "not a valid schema"),
        ("{\"prompt\": \"x\", \"exact\": \"y\", \"min_score\": 0}", "min_score"),
        ("{\"prompt\": \"x\", \"exact\": \"y\", \"min_score\": 1.5}", "min_score"),
        ("{\"prompt\": \"x\", \"exact\": \"y\", \"max_tokens\": 0}", "max_tokens"),
        ("{\"prompt\": \"x\", \"exact\": \"y\", \"max_tokens\": 100000}", "max_tokens"),
        ("{\"prompt\": \"x\", \"exact\": \"y\", \"max_chars\": -1}", "not a case"),
        ("[1, 2]", "not a case"),
        ("\u{0}", "not a case"),
    ];
    for (line, want) in bad {
        let text = format!("{{\"prompt\": \"fine\", \"exact\": \"ok\"}}\n\n{line}\n");
        let e = EvalSuite::parse_jsonl(&text).expect_err(line);
        assert_eq!(e.line, 3, "{line}: {e}");
        assert!(e.to_string().starts_with("line 3: ") && e.message.contains(want), "{line}: {e}");
    }
    let many: String = (0..=MAX_CASES).map(|i| format!("{{\"prompt\": \"p{i}\", \"exact\": \"a\"}}\n")).collect();
    let e = EvalSuite::parse_jsonl(&many).expect_err("too many");
    assert!(e.message.contains("more than") && e.line == MAX_CASES + 1, "{e}");
    assert_eq!(EvalSuite::parse_jsonl("# nothing\n\n").expect_err("empty").line, 0);
    let huge = "#".repeat(MAX_SUITE_BYTES + 1);
    assert!(EvalSuite::parse_jsonl(&huge).expect_err("huge").message.contains("larger"));
    let long = format!("{{\"prompt\": \"{}\", \"exact\": \"a\"}}", "p".repeat(MAX_PROMPT_LEN + 1));
    assert!(EvalSuite::parse_jsonl(&long).expect_err("long prompt").message.contains("prompt"));
}

#[test]
fn checks_judge_answers() {
    let s = suite();
    let capital = &s.cases[0];
    assert!(capital.check("The capital is PARIS.").passed);
    let no = capital.check("Lyon");
    assert!(!no.passed && no.failures[0].contains("none of"), "{no:?}");
    let json = &s.cases[1];
    assert!(json.check("{\"ok\": true}").passed);
    assert!(json.check("```json\n{\"ok\": 1}\n```").passed, "a fenced answer is read inside its fence");
    let missing = json.check("{\"fine\": true}");
    assert!(!missing.passed && missing.failures[0].contains("not valid against the schema"), "{missing:?}");
    assert!(json.check("ok!").failures[0].contains("not JSON"));
    // Three checks, half must hold: "4" passes all, " 4 apples" two of three
    // (not exact), "five" none.
    let sum = &s.cases[2];
    let all = sum.check(" 4 ");
    assert_eq!((all.checks, all.checks_passed, all.passed), (3, 3, true));
    let most = sum.check("4 apples");
    assert_eq!((most.checks_passed, most.passed), (2, true));
    let none = sum.check("five, I believe");
    assert_eq!((none.checks_passed, none.passed), (0, false), "{none:?}");
    assert_eq!(none.failures.len(), 3);
}

#[test]
fn counts_add_up_and_bogus_counts_have_no_rate() {
    let s = suite();
    // "nope" fails the third case but holds its max_chars check.
    let (counts, outcomes) = s.score(["Paris", "{\"ok\": 1}", "nope"]);
    assert_eq!(outcomes.len(), 3);
    assert_eq!(counts, EvalCounts { cases: 3, passed: 2, checks: 5, checks_passed: 3, previous_passed: None });
    assert!((counts.pass_rate().expect("rate") - 2.0 / 3.0).abs() < 1e-9);
    assert_eq!(EvalCounts::default().pass_rate(), None);
    assert_eq!(EvalCounts { cases: 2, passed: 3, ..Default::default() }.pass_rate(), None);
    let mut max = EvalCounts {
        cases: u32::MAX,
        passed: u32::MAX,
        checks: u32::MAX,
        checks_passed: u32::MAX,
        previous_passed: None,
    };
    max.add(&outcomes[0]);
    assert_eq!(max.cases, u32::MAX);
}

proptest::proptest! {
    #[test]
    fn no_suite_file_or_answer_panics(text in ".{0,400}", answer in ".{0,200}") {
        let _ = EvalSuite::parse_jsonl(&text);
        for case in suite().cases {
            let outcome = case.check(&answer);
            proptest::prop_assert!(outcome.checks_passed <= outcome.checks);
        }
    }
}

#[test]
fn a_settings_line_asks_for_a_comparison_once() {
    let s = EvalSuite::parse_jsonl(&format!("{{\"compare_with_previous\": true}}\n{SUITE}")).expect("suite");
    assert!(s.compare_with_previous && s.cases.len() == 3);
    assert!(!suite().compare_with_previous);
    for (text, want) in [
        (
            "{\"compare_with_previous\": true}\n{\"compare_with_previous\": false}\n",
            "line 2: compare_with_previous is given twice",
        ),
        ("{\"compare_with_previous\": \"yes\"}\n", "line 1: not the suite's settings"),
        ("{\"compare_with_previous\": true, \"prompt\": \"x\"}\n", "line 1: not the suite's settings"),
    ] {
        let err = EvalSuite::parse_jsonl(text).unwrap_err().to_string();
        assert!(err.contains(want), "{text:?}: {err}");
    }
    // A settings line alone is no suite.
    let err = EvalSuite::parse_jsonl("{\"compare_with_previous\": true}\n").unwrap_err().to_string();
    assert!(err.contains("no case"), "{err}");
    // The margin over the previous version, from counts a remote node may have made up.
    let c = |passed, previous| EvalCounts { cases: 10, passed, previous_passed: previous, ..Default::default() };
    assert_eq!(c(7, Some(9)).margin_over_previous(), Some(-2.0));
    assert_eq!(c(7, None).margin_over_previous(), None);
    assert_eq!(c(7, Some(11)).margin_over_previous(), None);
    assert_eq!(c(12, Some(1)).margin_over_previous(), None);
}
