# blocker's container image: non-root, read-only friendly; config and blocklists in the /etc/blocker volume.
FROM python:3.11-slim-bookworm

WORKDIR /src
COPY pyproject.toml README.md ./
COPY blocker ./blocker
COPY blocklists ./blocklists
# DL3013: this installs the project itself from the build context; its own version is what is pinned.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[fast,console]" \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin blocker \
    && rm -rf /src

COPY deploy/container/blocker.yaml /etc/blocker/blocker.yaml
COPY blocklists /etc/blocker/blocklists
WORKDIR /etc/blocker
VOLUME ["/etc/blocker"]
USER 10001
EXPOSE 8053/udp 8053/tcp 9153/tcp
HEALTHCHECK --interval=30s --timeout=3s CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9153/healthz', timeout=2)"]
ENTRYPOINT ["blocker"]
CMD ["serve", "--config", "/etc/blocker/blocker.yaml"]
