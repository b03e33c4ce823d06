"""The prediction service over real HTTP: `cvops serve` (gunicorn, 2 uvicorn workers) on a free
port, with a small Fashion-MNIST model published into a throw-away central storage."""
import numpy as np
import pytest
import requests
import sqlalchemy as sa

from service_support import encode

pytestmark = pytest.mark.service


def _counts(db_url):
    from cvops.predlog import api_log, predictions
    eng = sa.create_engine(db_url)
    with eng.connect() as c:
        out = {t.name: c.execute(sa.select(sa.func.count()).select_from(t)).scalar() for t in (api_log, predictions)}
    eng.dispose()
    return out


def test_round_trip_classes_right_and_same_preprocessing_as_training(service_root, service_factory, trained_models):
    "Real test images over HTTP: mostly right, and the probabilities equal the model on cvops.data.preprocess."
    import keras
    from cvops.data import preprocess, to_model_input
    svc = service_factory(service_root["root"])
    svc.wait_workers_ready(service_root["a"])
    folder, xt, yt, acc = trained_models["a"]
    model = keras.models.load_model(folder / "model.keras", compile=False)
    classes = requests.get(svc.url("/models/current"), timeout=5).json()["classes"]
    right = 0
    for i in range(20):
        data = encode(xt[i], "PNG")
        r = svc.predict(data)
        assert r.status_code == 200, r.text
        d = r.json()
        assert d["model_name"] == "fashion_small" and d["model_version"] == service_root["a"]
        assert abs(sum(d["probabilities"].values()) - 1) < 1e-3 and d["heatmap"] and d["overlay"]
        right += d["top_class"] == classes[yt[i]]
        expected = np.asarray(model(to_model_input(preprocess(data, (28, 28), 1)[None])))[0]
        got = np.array([d["probabilities"][c] for c in classes])
        np.testing.assert_allclose(got, expected, atol=1e-4)
    assert right >= 14, f"{right}/20 right (model accuracy {acc:.2f})"
    svc.stop()
    counts = _counts(f"sqlite:///{service_root['root'] / 'var' / 'cvops.db'}")
    assert counts["predictions"] == 20 and counts["api_log"] >= 20
