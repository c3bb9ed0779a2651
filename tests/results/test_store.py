import pytest

from selfsup.results.store import Result, Store


def _row(value, metric="top1", protocol="knn"):
    return Result(model="m", model_hash="abc", dataset="sample", split="test", protocol=protocol,
                  tap="pre_logits", config_hash="h", metric=metric, value=value, config={"k": 200})


def test_put_query_replace(tmp_path):
    store = Store(tmp_path / "r.sqlite")
    store.put([_row(50.0), _row(60.0, protocol="linear")])
    store.put([_row(55.0)])  # the same key replaces, it does not duplicate
    rows = store.query(protocol="knn")
    assert [r.value for r in rows] == [55.0] and rows[0].config == {"k": 200}
    assert store.has(model="m", protocol="linear") and not store.has(model="other")
    with pytest.raises(KeyError, match="unknown result field"):
        store.query(nonsense=1)
    store.close()
    assert len(Store(tmp_path / "r.sqlite").query()) == 2  # persisted
