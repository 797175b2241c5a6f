"""What the client scripts share: asking /predictions for the answer to compare with,
and reporting each check by name."""

import json
import urllib.request


def predictions(base, model, body):
    """The JSON answer of POST {base}/predictions/{model} with `body`."""
    request = urllib.request.Request(
        f"{base}/predictions/{model}",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    return json.load(urllib.request.urlopen(request))


def check(name, condition, detail=""):
    """Fails with `name` and `detail` unless `condition`; prints `ok name` otherwise."""
    if not condition:
        raise AssertionError(f"{name}: {detail}")
    print(f"ok {name}")
