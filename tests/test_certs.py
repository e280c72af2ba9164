"""``fedmed certs`` / ``fedmed site-key``: existing keys are never replaced without --force."""

from __future__ import annotations

import stat

import pytest

from fedmed.certs import WouldOverwrite, create_certificates, create_site_key
from fedmed.cli import main as fedmed_main


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_certs_refuse_to_overwrite_and_name_the_file(tmp_path, capsys):
    out = tmp_path / "certs"
    assert fedmed_main(["certs", "--out", str(out), "--host", "127.0.0.1"]) == 0
    before = _snapshot(out)
    assert set(before) == {"ca.crt", "ca.key", "server.pem", "server.key"}
    assert stat.S_IMODE((out / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((out / "server.key").stat().st_mode) == 0o600
    capsys.readouterr()
    assert fedmed_main(["certs", "--out", str(out), "--host", "127.0.0.1"]) == 2
    err = capsys.readouterr().err
    assert str(out / "ca.key") in err and "--force" in err and "refusing to overwrite" in err
    assert _snapshot(out) == before  # nothing was replaced, not even the public files
    assert fedmed_main(["certs", "--out", str(out), "--host", "127.0.0.1", "--force"]) == 0
    after = _snapshot(out)
    assert all(after[n] != before[n] for n in before)  # --force made a new CA and server key


def test_certs_refuse_when_only_one_file_exists(tmp_path):
    out = tmp_path / "certs"
    out.mkdir()
    (out / "server.key").write_bytes(b"old key")
    with pytest.raises(WouldOverwrite, match="server.key"):
        create_certificates(out, hosts=["localhost"])
    assert sorted(p.name for p in out.iterdir()) == ["server.key"]  # no partial set written


def test_site_key_refuses_to_overwrite(tmp_path, capsys):
    keys = tmp_path / "keys"
    assert fedmed_main(["site-key", "--site", "hospital_a", "--out", str(keys)]) == 0
    before = _snapshot(keys)
    assert stat.S_IMODE((keys / "hospital_a").stat().st_mode) == 0o600
    capsys.readouterr()
    assert fedmed_main(["site-key", "--site", "hospital_a", "--out", str(keys)]) == 2
    err = capsys.readouterr().err
    assert str(keys / "hospital_a") in err and "--force" in err
    assert _snapshot(keys) == before
    assert fedmed_main(["site-key", "--site", "hospital_a", "--out", str(keys), "--force"]) == 0
    assert _snapshot(keys)["hospital_a"] != before["hospital_a"]
    # another site's key in the same folder is fine
    create_site_key(keys, site="hospital_b")


def test_site_key_force_does_not_write_through_a_symlink(tmp_path):
    keys = tmp_path / "keys"
    keys.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (keys / "hospital_a").symlink_to(victim)
    with pytest.raises(WouldOverwrite):
        create_site_key(keys, site="hospital_a")
    create_site_key(keys, site="hospital_a", force=True)
    assert victim.read_text() == "precious" and not (keys / "hospital_a").is_symlink()


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden", ""])
def test_site_key_rejects_names_that_are_not_plain_file_names(tmp_path, name):
    with pytest.raises(ValueError, match="site name"):
        create_site_key(tmp_path, site=name)
