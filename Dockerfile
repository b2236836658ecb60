# vireid on the CPU: the demo by default, the test suite on request.
#
#   docker build -t vireid .
#   docker run --rm vireid                                      # vireid demo (writes runs/demo-… in the container)
#   docker run --rm -v "$PWD/runs:/opt/vireid/runs" vireid      # ... and keep the run folder on the host
#   docker run --rm -e CI=true vireid python -m pytest          # the test suite, browser test included
#
# The browser test of the search page drives Debian's Chromium (/usr/bin/chromium), installed below.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/vireid
# Only the project's own files: no virtual environment, run folders or git history from the host.
COPY pyproject.toml README.md LICENSE CHANGELOG.md constraints.txt ./
COPY src/ src/
COPY configs/ configs/
COPY tests/ tests/
COPY benchmarks/ benchmarks/
COPY tools/ tools/
COPY docs/ docs/
# The versions the test suite was run with (constraints.txt); pip install -e '.[test]' alone takes the newest in range.
RUN pip install -c constraints.txt -e '.[test]'

CMD ["vireid", "demo"]
