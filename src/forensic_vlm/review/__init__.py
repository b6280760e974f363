"""The examiner's review of a triage: decisions kept as data, apart from the evidence (issue 26)."""
