"""Credentials in a tracking URI: removed wherever a URI is shown, moved into MLflow's variables at
the edge, kept out of what Tune pickles, and named by source when a server refuses them."""

from __future__ import annotations

import os
import pickle

import pytest

from flatbasin.search import credentials
from flatbasin.search.credentials import adopt, redact_uri, scrub, user_info
from flatbasin.search.store import refusal_message
from flatbasin.search.tracking import Tracker
from flatbasin.search.tracking_uri import browse_hint

VARIABLES = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_URI",
             "MLFLOW_TRACKING_TOKEN", credentials.USERNAME_FROM, credentials.PASSWORD_FROM)  # fmt: skip


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch, tmp_path):
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.mlflow/credentials of the machine's
    monkeypatch.setattr(credentials, "_SECRETS", set())


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("http://alice:s3cret@host:5000", "http://host:5000"),
        ("https://alice:p%40ss%2Fword@host:5000/prefix", "https://host:5000/prefix"),
        ("http://alice:p@ss@host:5000", "http://host:5000"),  # an '@' left unencoded
        ("http://alice@host:5000", "http://host:5000"),
        ("postgresql://mlflow:pg-pass@db:5432/mlflow", "postgresql://db:5432/mlflow"),
        ("postgresql://db/mlflow?password=qs-pass&sslmode=require",
         "postgresql://db/mlflow?password=***&sslmode=require"),
        ("http://[::1]:5000", "http://[::1]:5000"),
        ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
        ("/tmp/mlruns", "/tmp/mlruns"),
    ],
)  # fmt: skip
def test_redact_uri_removes_user_info_and_secret_query_values(uri, shown):
    assert redact_uri(uri) == shown
    assert "pass" not in browse_hint(uri).replace("password=***", "")


def test_user_info_is_decoded():
    assert user_info("http://al%20ice:p%40ss%2F1@h:1") == ("al ice", "p@ss/1")
    assert user_info("http://alice@h:1") == ("alice", None)
    assert user_info("http://h:1") == (None, None)


def test_adopt_moves_a_servers_credentials_into_the_environment():
    clean = adopt("http://alice:p%40ss-0123@127.0.0.1:5000", "--tracking-uri")
    assert clean == "http://127.0.0.1:5000"
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "alice"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "p@ss-0123"
    assert credentials.from_uri()
    assert scrub("API request to http://alice:p%40ss-0123@h failed; p@ss-0123") == (
        "API request to http://h failed; ***"
    )


def test_adopt_wins_over_the_environment_and_cleans_mlflow_tracking_uri(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "bob")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://alice:pw-uri-0123@h:5000")
    assert adopt("http://alice:pw-uri-0123@h:5000", "$MLFLOW_TRACKING_URI") == "http://h:5000"
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "alice"
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://h:5000"  # what Ray's workers inherit


def test_a_database_uri_keeps_its_password_for_its_driver_and_never_shows_it():
    uri = "postgresql://mlflow:pg-pass-0123@db:5432/mlflow"
    assert adopt(uri, "--tracking-uri") == uri  # the driver reads it from the URI
    assert "MLFLOW_TRACKING_PASSWORD" not in os.environ
    tracker = Tracker(uri, "x", search_key="k")
    assert "pg-pass-0123" not in tracker.shown
    assert b"pg-pass-0123" not in pickle.dumps(tracker)  # what Tune keeps in tuner.pkl
    assert scrub("connection to mlflow:pg-pass-0123 failed") == "connection to mlflow:*** failed"


def test_a_refusal_names_where_each_credential_came_from(monkeypatch, tmp_path):
    uri = "http://127.0.0.1:5000"
    assert "none were given" in refusal_message(uri, 401)
    adopt("http://alice:wrong-0123@127.0.0.1:5000", "--tracking-uri")
    text = refusal_message(uri, 401)
    assert "user 'alice' (both from the user-info of --tracking-uri) are wrong" in text, text
    assert "wrong-0123" not in text
    assert "(both from the user-info of --tracking-uri) has no permission" in refusal_message(
        uri, 403
    )
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "carol")
    text = refusal_message(uri, 401)
    assert "user 'carol' came from $MLFLOW_TRACKING_USERNAME, but no password" in text, text
    (tmp_path / ".mlflow").mkdir()
    (tmp_path / ".mlflow" / "credentials").write_text("[mlflow]\nmlflow_tracking_password = x\n")
    text = refusal_message(uri, 401)
    assert (
        "the username from $MLFLOW_TRACKING_USERNAME, the password from ~/.mlflow/credentials"
        in text
    )
