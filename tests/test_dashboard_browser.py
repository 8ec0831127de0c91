"""The dashboard in a real browser: server subprocess + headless Chromium.

Starts `python -m medseg_jax.dashboard` on a free 127.0.0.1 port with the
tiny trained run, uploads a PNG, waits for the overlay, moves the threshold
slider with the keyboard and checks that the mask shown changes (area and
image), uploads a corrupt file and checks the error, and saves a screenshot
(to $MEDSEG_SCREENSHOT, e.g. docs/dashboard.png, when set; then with the
Grad-CAM and MC-dropout maps shown too). The README's screenshot:

    MEDSEG_SCREENSHOT=docs/dashboard.png MEDSEG_DASHBOARD_WORKDIR=runs/x \
        python -m pytest -q tests/test_dashboard_browser.py

Without Chromium, chromedriver or selenium the test skips locally and FAILS
in CI (the CI environment variable is set).
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

try:
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service
  from selenium.webdriver.common.action_chains import ActionChains
  from selenium.webdriver.common.by import By
  from selenium.webdriver.common.keys import Keys
except ImportError:  # Skipped locally, a failure in CI: see _browser.
  webdriver = None

from medseg_jax.data import synthetic
from tests.conftest import REPO, subprocess_env

WAIT_S = 60  # Longest wait for any one thing; the test takes ~20 s.
HEIGHT, WIDTH = 192, 256  # The upload; its full area is HEIGHT * WIDTH px.


def _need(what: str):
  message = f'browser test needs {what}'
  if os.environ.get('CI'):
    pytest.fail(message + ' (in CI the browser test must run: install '
                'chromium and chromium-driver, pip install selenium).')
  pytest.skip(message)


def _browser():
  """Returns a headless Chromium WebDriver, or skips / fails (CI)."""
  if webdriver is None:
    _need('selenium (pip install selenium)')
  binary = next(filter(None, map(shutil.which, (
      'chromium', 'chromium-browser', 'google-chrome'))), None)
  driver = shutil.which('chromedriver')
  if binary is None or driver is None:
    _need('chromium and chromedriver (apt-get install chromium '
          'chromium-driver)')
  options = webdriver.ChromeOptions()
  options.binary_location = binary
  for arg in ('--headless=new', '--no-sandbox', '--disable-dev-shm-usage',
              '--disable-gpu', '--window-size=1440,1400',
              '--force-device-scale-factor=1'):
    options.add_argument(arg)
  try:
    return webdriver.Chrome(service=Service(driver), options=options)
  except Exception as e:  # pylint: disable=broad-except
    _need(f'a Chromium that starts ({type(e).__name__}: {e})')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _wait(condition, what: str, timeout: float = WAIT_S):
  """Returns condition()'s first truthy value; fails after `timeout` s."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    try:
      value = condition()
    except Exception:  # pylint: disable=broad-except
      value = None  # Elements re-rendered under us: look again.
    if value:
      return value
    time.sleep(0.2)
  raise AssertionError(f'timed out after {timeout:.0f} s waiting for {what}')


def _lesion_pngs(image_path, mask_path) -> int:
  """Writes a synthetic dermoscopy photo and its 0/255 mask; returns |mask|."""
  tone, _ = synthetic.patient_skin(0, 59)
  image, mask = synthetic.render_lesion(np.random.default_rng(59),
                                        (HEIGHT, WIDTH), tone)
  Image.fromarray(image).save(image_path)
  Image.fromarray(mask * 255).save(mask_path)
  return int(mask.sum())


@pytest.fixture
def driver():
  """Headless Chromium, checked before the run is trained and served."""
  browser = _browser()
  yield browser
  browser.quit()


@pytest.fixture
def server(request, tmp_path):
  """The dashboard of the tiny 2D run; yields its URL; always stopped.

  $MEDSEG_DASHBOARD_WORKDIR serves another binary 2D run instead (a
  better-trained one for the README's screenshot).
  """
  workdir = (os.environ.get('MEDSEG_DASHBOARD_WORKDIR') or
             request.getfixturevalue('run2d'))
  port = _free_port()
  log = open(tmp_path / 'server.log', 'w+')
  proc = subprocess.Popen(
      [sys.executable, '-m', 'medseg_jax.dashboard', f'--workdir={workdir}',
       '--port', str(port)], cwd=REPO, env=subprocess_env(1), stdout=log,
      stderr=subprocess.STDOUT, start_new_session=True)
  url = f'http://127.0.0.1:{port}'
  try:
    def healthy():
      if proc.poll() is not None:
        log.seek(0)
        raise AssertionError(f'dashboard exited ({proc.returncode}):\n'
                             f'{log.read()[-3000:]}')
      try:
        with urllib.request.urlopen(url + '/_stcore/health', timeout=2) as r:
          return r.status == 200
      except OSError:
        return False
    deadline = time.monotonic() + WAIT_S
    while not healthy():
      assert time.monotonic() < deadline, 'dashboard did not start'
      time.sleep(0.2)
    yield url
  finally:
    os.killpg(proc.pid, signal.SIGTERM)  # Its own session: only its group.
    try:
      proc.wait(5)
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait(10)
    log.close()


def _metric_values(driver) -> list[str]:
  return [e.text for e in driver.find_elements(
      By.CSS_SELECTOR, '[data-testid="stMetricValue"]')]


def _overlay_src(driver) -> str | None:
  """The URL of the overlay image (the second image: input, overlay)."""
  images = driver.find_elements(By.CSS_SELECTOR, '[data-testid="stImage"] img')
  return images[1].get_attribute('src') if len(images) >= 2 else None


def _threshold(driver):
  """The threshold slider's range input (the first slider, in the sidebar)."""
  return driver.find_element(
      By.CSS_SELECTOR, '[data-testid="stSlider"] input[type="range"]')


def _press(driver, key, times):
  """Focuses the threshold slider and presses `key` `times` times."""
  # The range input is visually hidden under the thumb: focus it as a
  # keyboard user's Tab would, then type.
  driver.execute_script('arguments[0].focus();', _threshold(driver))
  for _ in range(times):
    ActionChains(driver).send_keys(key).perform()


def _upload(driver, index, path):
  """Sends a file to the `index`-th uploader (0: cases, 1: ground truth)."""
  inputs = driver.find_elements(By.CSS_SELECTOR, 'input[type="file"]')
  inputs[index].send_keys(str(path))


def _show_maps(driver):
  """Turns Grad-CAM and MC dropout on and waits for their four images."""
  for label in ('Grad-CAM', 'Uncertainty (MC dropout)'):
    driver.find_element(By.XPATH, f'//label[.//p[text()="{label}"]]').click()
    time.sleep(0.5)
  _wait(lambda: len(driver.find_elements(
      By.CSS_SELECTOR, '[data-testid="stImage"] img')) >= 6,
        'the Grad-CAM and MC-dropout maps')


def test_dashboard_in_chromium(driver, server, tmp_path):
  """Upload, overlay, Dice, threshold slider, corrupt file, screenshot."""
  full = HEIGHT * WIDTH
  driver.get(server)
  _wait(lambda: driver.find_elements(By.CSS_SELECTOR, 'input[type="file"]'),
        'the file uploader')
  truth = _lesion_pngs(tmp_path / 'lesion_059.png',
                       tmp_path / 'lesion_059_segmentation.png')
  _upload(driver, 0, tmp_path / 'lesion_059.png')
  _wait(lambda: _metric_values(driver) and _overlay_src(driver),
        'the overlay and the lesion area')
  _upload(driver, 1, tmp_path / 'lesion_059_segmentation.png')
  _wait(lambda: len(_metric_values(driver)) == 2, 'the Dice of the mask')
  shot = os.environ.get('MEDSEG_SCREENSHOT')
  if shot:  # The README's picture: with Grad-CAM and uncertainty maps.
    _show_maps(driver)
    driver.set_window_size(1440, 1600)
    time.sleep(1)  # Let the images settle at the new size.
  shot = shot or str(tmp_path / 'dashboard.png')
  driver.save_screenshot(shot)
  assert os.path.getsize(shot) > 10_000

  assert _threshold(driver).get_attribute('value') == '0.5'
  # Arrows down to 0.0: every probability exceeds it: all lesion.
  _press(driver, Keys.ARROW_LEFT, 10)
  dice = 2 * truth / (truth + full)
  _wait(lambda: _metric_values(driver) == [f'{full:,} px', f'{dice:.3f}'],
        f'the full image ({full} px, Dice {dice:.3f}) at threshold 0')
  full_src = _overlay_src(driver)
  # End: 1.0, no probability exceeds it: an empty mask, Dice 0.
  _press(driver, Keys.END, 1)
  empty_values = ['0 px', '0.000']
  _wait(lambda: _metric_values(driver) == empty_values,
        'an empty mask at threshold 1.0')
  assert full_src != _overlay_src(driver), 'the overlay did not change'

  broken = tmp_path / 'broken.png'
  broken.write_bytes(b'\x89PNG\r\n\x1a\n this is not an image')
  _upload(driver, 0, broken)
  alert = _wait(lambda: [e.text for e in driver.find_elements(
      By.CSS_SELECTOR, '[data-testid="stAlert"]') if 'broken.png' in e.text],
                'the error message of the corrupt file')
  assert 'cannot' in alert[0].lower(), alert
  # The good upload is still shown, and there is no traceback.
  assert _metric_values(driver) == empty_values
  assert not driver.find_elements(By.CSS_SELECTOR,
                                  '[data-testid="stException"]')
