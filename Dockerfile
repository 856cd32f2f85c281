# airlock/appliance: supervisord (under tini) runs sockguard, the egress proxy and the agent, each as
# its own non-root user. Built by images/build.py, which stages the context (wheels/, src/, policy/).
#
# Offline: BASE_IMAGE is the debootstrapped airlock/base (python3, venv, tini already inside).
# Online:  docker build --build-arg BASE_IMAGE=debian:bookworm-slim <staged context>
#
# FASTPATH_IMAGE holds /usr/local/bin/airlock-fastpath, built from fastpath/ by images/fastpath/Dockerfile;
# images/build.py builds it first and passes its content tag. Where pulling is allowed, build it first:
#   docker build -f images/fastpath/Dockerfile -t airlock/fastpath:latest fastpath
ARG BASE_IMAGE=debian:bookworm-slim
ARG FASTPATH_IMAGE=airlock/fastpath:latest

FROM ${FASTPATH_IMAGE} AS fastpath

FROM ${BASE_IMAGE} AS venv
COPY images/ensure-python.sh /tmp/ensure-python.sh
RUN sh /tmp/ensure-python.sh
COPY requirements.lock /tmp/requirements.lock
COPY images/install-venv.sh /tmp/install-venv.sh
COPY wheels/ /tmp/wheels/
RUN sh /tmp/install-venv.sh /opt/airlock/venv

FROM ${BASE_IMAGE}
COPY images/ensure-python.sh /tmp/ensure-python.sh
RUN sh /tmp/ensure-python.sh && rm /tmp/ensure-python.sh \
 && groupadd --system --gid 10100 airlock-sockguard \
 && groupadd --system --gid 10101 airlock-egress \
 && groupadd --system --gid 10102 airlock-agent \
 && useradd --system --no-create-home --uid 10100 --gid 10100 --shell /usr/sbin/nologin airlock-sockguard \
 && useradd --system --no-create-home --uid 10101 --gid 10101 --shell /usr/sbin/nologin airlock-egress \
 && useradd --system --no-create-home --uid 10102 --gid 10102 --shell /usr/sbin/nologin airlock-agent
COPY --from=venv /opt/airlock/venv /opt/airlock/venv
COPY src/ /opt/airlock/src/
COPY policy/ /etc/airlock/policy/
COPY images/appliance/supervisord.conf /etc/airlock/supervisord.conf
COPY images/appliance/entrypoint.sh /usr/local/bin/airlock-entrypoint
COPY images/appliance/airlock /usr/local/bin/airlock
COPY --from=fastpath /usr/local/bin/airlock-fastpath /usr/local/bin/airlock-fastpath
RUN echo /opt/airlock/src > "$(/opt/airlock/venv/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/airlock.pth" \
 && chmod 0755 /usr/local/bin/airlock /usr/local/bin/airlock-entrypoint \
 && /opt/airlock/venv/bin/python -m compileall -q /opt/airlock/src \
 && install -d -o airlock-agent -g airlock-agent -m 0700 /var/lib/airlock \
 && install -d -o root -g root -m 0755 /etc/airlock/operator
ENV PATH=/opt/airlock/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 \
    AIRLOCK_POLICY_DIR=/etc/airlock/policy \
    AIRLOCK_STATE_DIR=/var/lib/airlock \
    AIRLOCK_DOCKER_HOST=unix:///run/airlock/sockguard/docker.sock \
    AIRLOCK_UPSTREAM_SOCKET=/var/run/docker.sock \
    AIRLOCK_LOCATIONS=/etc/airlock/locations.yaml
# The operator's image allowlist (airlock images allow): root writes it, sockguard and the agent read it.
VOLUME ["/var/lib/airlock", "/etc/airlock/operator"]
LABEL airlock.role=appliance
HEALTHCHECK --interval=15s --timeout=10s --start-period=20s --retries=3 CMD ["airlock", "health"]
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/airlock-entrypoint"]
CMD ["supervisord", "-n", "-c", "/etc/airlock/supervisord.conf"]
