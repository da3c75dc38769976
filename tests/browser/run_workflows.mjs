// Loads every shipped workflow in the real ComfyUI frontend (headless Chromium), checks that no
// node type is missing, converts it with the frontend's own graphToPrompt, queues it (with a
// small size level and few steps, so a CPU finishes) and waits for the result. Prints one JSON
// report on stdout; tests/comfyui/test_browser.py makes the assertions.
//
//   node run_workflows.mjs URL WORKFLOW_DIR SCREENSHOT_DIR CHROMIUM
import { readFileSync, readdirSync, mkdirSync } from "node:fs";
import { join } from "node:path";
import { chromium } from "playwright-core";

const [url, workflowDir, screenshotDir, executablePath] = process.argv.slice(2);
const FAST = { Step1XEditImageScale: { size_level: "custom", custom_size: 64 }, Step1XEditSampler: { steps: 2 },
               Step1XEditScheduler: { steps: 2 }, EmptySD3LatentImage: { width: 64, height: 48 },
               Step1XEditReflect: { steps: 1, size_level: 64, rounds: 1, judge_tries: 1, max_new_tokens: 4 } };

const browser = await chromium.launch({
  executablePath,
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"],
});
// A dialog's own close button: PrimeVue's header button (frontend 1.27) or the × in the content of the
// frontend's full-size dialogs (1.32's template browser, which has no header and ignores Escape).
const DIALOG_CLOSE = ".p-dialog-close-button:visible, button:visible:has(> .pi-times)";
const report = { workflows: {}, consoleErrors: [], dialogsClosed: [] };
try {
  const page = await browser.newPage({ viewport: { width: 1600, height: 900 } });
  let phase = "startup";
  // Closes every dialog the frontend opened by itself, as a user would: its close button, else Escape.
  const closeDialogs = async () => {
    for (let i = 0; i < 5; i++) {
      const dialog = page.locator(".p-dialog:visible").first();
      if (!await dialog.count()) return;
      report.dialogsClosed.push(`${phase}: ${await dialog.getAttribute("aria-labelledby") ?? "a dialog"}`);
      const close = dialog.locator(DIALOG_CLOSE).first();
      if (await close.count()) await close.click();
      else await page.keyboard.press("Escape");
      await page.waitForTimeout(500);
    }
  };
  page.on("pageerror", (err) => report.consoleErrors.push(`${phase}: ${err.stack ?? err}`));
  await page.goto(url, { waitUntil: "domcontentloaded" });
  await page.waitForFunction(() => window.app?.graph && window.LiteGraph?.registered_node_types, null,
                             { timeout: 120000 });
  report.extensionLoaded = await page.evaluate(() => {
    const registered = window.app.extensions?.some?.((e) => e.name === "Step1XEdit.WorkingSize");
    const hooked = String(window.LiteGraph.registered_node_types.Step1XEditImageScale?.prototype.onDrawForeground)
      .includes("step1xWorkingSize");
    return Boolean(registered || hooked);
  });
  // A first start (the server has a fresh user directory) opens the template browser over the canvas
  // once the frontend has set itself up; close it as a user would, so the screenshots (the shipped
  // thumbnails) show the workflows.
  await page.locator(".p-dialog").first().waitFor({ state: "visible", timeout: 20000 }).catch(() => {});
  await closeDialogs();
  // Frontend 1.32 announces its new node design in a banner above the canvas: dismiss it with its ×.
  const banner = page.locator('div:has-text("Introducing Nodes 2.0") > button:visible:has(> i[class*="lucide--x"])');
  if (await banner.count()) await banner.first().click();
  mkdirSync(screenshotDir, { recursive: true });

  for (const file of readdirSync(workflowDir).filter((f) => f.endsWith(".json")).sort()) {
    const name = file.replace(/\.json$/, "");
    phase = name;
    const workflow = JSON.parse(readFileSync(join(workflowDir, file), "utf8"));
    const loaded = await page.evaluate(async (workflow) => {
      const types = window.LiteGraph.registered_node_types;
      const missing = [...new Set(workflow.nodes.map((n) => n.type))].filter((t) => !types[t]);
      await window.app.loadGraphData(workflow);
      return { missing, converted: (await window.app.graphToPrompt()).output };
    }, workflow);
    await page.waitForTimeout(1000);  // let the input image load and the canvas draw
    await closeDialogs();
    await page.screenshot({ path: join(screenshotDir, `${name}.png`) });  // as shipped
    const result = await page.evaluate(async ({ fast }) => {
      for (const node of window.app.graph._nodes) {
        for (const [widgetName, value] of Object.entries(fast[node.type] ?? {})) {
          const widget = node.widgets?.find((w) => w.name === widgetName);
          if (widget) widget.value = value;
        }
      }
      const fastPrompt = await window.app.graphToPrompt();
      const response = await window.app.api.queuePrompt(0, fastPrompt);
      return { promptId: response.prompt_id };
    }, { fast: FAST });
    // Wait for the run to finish (history entry with a status) while the canvas keeps drawing.
    const status = await page.evaluate(async (promptId) => {
      for (let i = 0; i < 600; i++) {
        const history = await (await fetch(`/history/${promptId}`)).json();
        const entry = history[promptId];
        if (entry?.status?.completed || entry?.status?.status_str === "error") {
          return { completed: entry.status.completed, status: entry.status.status_str,
                   messages: entry.status.messages, outputs: Object.keys(entry.outputs ?? {}) };
        }
        await new Promise((r) => setTimeout(r, 500));
      }
      return { completed: false, status: "timeout" };
    }, result.promptId);
    await page.waitForTimeout(500);
    const label = await page.evaluate(() => window.app.graph._nodes
      .filter((n) => n.type === "Step1XEditImageScale").map((n) => n.step1xWorkingSize ?? null));
    await closeDialogs();
    await page.screenshot({ path: join(screenshotDir, `${name}-run.png`) });  // after the test run
    report.workflows[name] = { missing: loaded.missing, converted: loaded.converted, status, workingSizeLabels: label };
  }
  report.dialogsLeftOpen = await page.locator(".p-dialog:visible").count();
} finally {
  await browser.close();
}
console.log(JSON.stringify(report));
