# blocker's container image: non-root, config and blocklists mounted at /etc/blocker.
FROM python:3.11-slim
WORKDIR /src
COPY pyproject.toml README.md ./
COPY blocker ./blocker
COPY blocklists ./blocklists
RUN pip install --no-cache-dir ".[fast]" \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin blocker \
    && rm -rf /src
WORKDIR /etc/blocker
USER 10001
EXPOSE 5353/udp 5353/tcp 9153/tcp
ENTRYPOINT ["blocker"]
CMD ["serve"]
