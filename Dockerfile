# canary: `docker build -t canary .` then
# `docker run -v $PWD/rollout.yaml:/etc/canary/rollout.yaml -p 8080:8080 canary`
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /opt/canary
COPY pyproject.toml README.md ./
COPY canary ./canary
RUN pip install --disable-pip-version-check . \
    && useradd --system --uid 10001 --home-dir /var/lib/canary --create-home canary

USER canary
WORKDIR /var/lib/canary
# canary-state.db (the default state.path) lives here: mount it to keep rollouts across restarts.
VOLUME /var/lib/canary
EXPOSE 8080
# The admin port binds to loopback by default, which is where the health check runs.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9901/healthz', timeout=2).status == 200 else 1)"
ENTRYPOINT ["canary", "run"]
CMD ["-c", "/etc/canary/rollout.yaml"]
