"""covidray's online endpoint: a Ray Serve application over ``covidray.predict.Predictor``.

``config`` (the application's arguments, a pydantic model), ``api`` (request and response
models), ``deployments`` (the batched model and the FastAPI ingress), ``app`` (``build_app``,
the import path of ``serving/config.yaml``), ``local`` (``covidray serve``). The library
(``covidray/``) knows nothing of this package.
"""
