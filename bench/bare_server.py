"""The ceiling of this machine's HTTP stack for any Python service: an ASGI app that reads the request body and answers a
fixed JSON body of a prediction's size, run by the service's own gunicorn worker class (uvicorn, uvloop, httptools) with
as many workers. No model, no logging, no parsing: `service_throughput.py` measures it beside the service (its `ceiling`
cells), so the service's figures can be read against what the server alone can do on the same cores.

    gunicorn -k cvops.serving.server.ServiceWorker -w 2 --chdir bench bare_server:app
"""
import os

BODY = b'{"pad":"' + b"x" * max(0, int(os.environ.get("BARE_RESPONSE_BYTES", "400")) - 10) + b'"}'
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup": await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"}); return
    more = True
    while more:                       # the upload is read, as the service reads it
        message = await receive()
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})
