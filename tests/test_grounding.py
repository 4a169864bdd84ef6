from pipelines.grounding import check_grounding, positive_terms, split_statements, ungrounded_rate

FINDINGS = (
    "The heart is enlarged. There is a small right pleural effusion. "
    "No pneumothorax. Calcified granuloma in the left upper lobe."
)


def test_split_statements_handles_numbering_and_sentences():
    assert split_statements("1. No acute disease. 2.Mild cardiomegaly.\n3) Low lung volumes") == [
        "No acute disease", "Mild cardiomegaly", "Low lung volumes",
    ]
    assert split_statements("Nodule measures 1.5 cm.") == ["Nodule measures 1.5 cm"]


def test_grounded_statements_pass():
    check = check_grounding(FINDINGS, "Cardiomegaly with small right pleural effusion. Calcified granulomas.")
    assert not check.flagged
    assert check.rate == 0.0


def test_added_finding_is_flagged():
    check = check_grounding(FINDINGS, "Cardiomegaly. Right lower lobe pneumonia.")
    assert check.flagged and check.n_flagged == 1
    bad = check.statements[1]
    assert bad.flagged and bad.unsupported == ("pneumonia",)
    assert check.rate == 0.5


def test_finding_denied_in_findings_is_contradicted():
    check = check_grounding(FINDINGS, "Small pneumothorax.")
    (statement,) = check.statements
    assert statement.flagged and statement.contradicted == ("pneumothorax",)


def test_negated_and_normal_statements_are_not_flagged():
    check = check_grounding(
        "Lungs are clear. Heart size normal.",
        "No acute cardiopulmonary process. No pneumothorax, effusion, or consolidation. Normal chest.",
    )
    assert not check.flagged
    assert all(s.terms == () for s in check.statements)


def test_negation_scope_stops_at_segment_and_terminator():
    assert positive_terms("Small effusion, no consolidation") == {"effus"}
    assert positive_terms("No effusion but new nodule") == {"nodul"}
    assert positive_terms("Heart is enlarged, lungs are clear") == {"heart", "enlarg"}


def test_min_support_relaxes_the_rule():
    strict = check_grounding(FINDINGS, "Pleural effusion and pneumonia.")
    lenient = check_grounding(FINDINGS, "Pleural effusion and pneumonia.", min_support=0.5)
    assert strict.flagged and not lenient.flagged


def test_ungrounded_rate_totals():
    checks = [
        check_grounding(FINDINGS, "Cardiomegaly. Pneumonia."),
        check_grounding(FINDINGS, "No acute disease."),
    ]
    assert ungrounded_rate(checks) == {
        "examples": 2, "examples_flagged": 1, "example_rate": 0.5,
        "statements": 3, "statements_flagged": 1, "statement_rate": 1 / 3,
    }
    assert ungrounded_rate([])["statement_rate"] == 0.0
