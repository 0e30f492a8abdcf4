# Stand-in for redis:7-alpine (tests only): Debian's redis-server, run as the official image runs
# it (in /data, protected mode off: it is reached from other containers, on a private network).
FROM distill-base:bookworm
RUN apt-get update \
    && apt-get install -y --no-install-recommends redis-server redis-tools \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /data
COPY redis-entrypoint.sh /usr/local/bin/redis-entrypoint.sh
WORKDIR /data
ENTRYPOINT ["/usr/local/bin/redis-entrypoint.sh"]
CMD ["redis-server"]
