// The prompt dictionary (GET /v1/prompt-dictionary) as pickers that cannot express a conflict: radio buttons where
// a category takes exactly one, radio buttons with "none" where it takes at most one, checkboxes that disable
// themselves at a category's limit (two hair colours), colour + outfit selects. "Build prompt" sends the choices
// to POST /v1/prompts/build, which still checks every rule, and fills the prompt boxes with its answer.

import { $, ApiError, api, el, fillSelect } from "./lib.js";

const RULES = {
  one: () => "exactly one",
  at_most_one: () => "at most one",
  colors: (c) => `up to ${c.max ?? 2}; none: random`,
  color: () => "one; none: random",
  many: (c) => (c.max ? `up to ${c.max}` : "any number"),
  outfit: () => "colour + outfit",
};

let dictionary = null;

function optionLabel(input, option) {
  const companions = option.companions?.length ? ` + ${option.companions.join(", ")}` : "";
  return el("label", { class: "choice", title: option.value + companions }, input,
    el("span", { text: option.label_ko || option.value }),
    el("small", { text: option.value + companions }));
}

function radios(category, options, withNone) {
  const name = `dict-${category.key}`;
  const chosen = category.default && options.some((o) => o.value === category.default)
    ? category.default : (withNone ? "" : options[0]?.value);
  const items = options.map((option) => optionLabel(
    el("input", { type: "radio", name, value: option.value, checked: option.value === chosen }), option));
  if (withNone) {
    items.unshift(optionLabel(el("input", { type: "radio", name, value: "", checked: chosen === "" }),
      { value: category.select === "color" ? "random" : "none", label_ko: category.select === "color" ? "무작위" : "없음" }));
  }
  return items;
}

/** Checkboxes that can never exceed `max`: the unchecked ones are disabled while `max` are checked. */
function checkboxes(category, options, max) {
  const name = `dict-${category.key}`;
  const boxes = options.map((option) => el("input", { type: "checkbox", name, value: option.value }));
  const enforce = () => {
    const full = max != null && boxes.filter((b) => b.checked).length >= max;
    for (const box of boxes) box.disabled = full && !box.checked;
  };
  boxes.forEach((box) => box.addEventListener("change", enforce));
  return boxes.map((box, i) => optionLabel(box, options[i]));
}

function outfitPicker(category) {
  const outfits = dictionary.outfits?.length ? dictionary.outfits : category.options;
  const color = el("select", { id: "dict-outfit-color", "aria-label": "Outfit colour" });
  const name = el("select", { id: "dict-outfit-name", "aria-label": "Outfit" });
  fillSelect(color, [["", "—"], ...dictionary.colors.map((c) => [c.value, `${c.label_ko} ${c.value}`])], false);
  fillSelect(name, [["", "none"], ...outfits.map((o) => [o.value, `${o.label_ko} ${o.value}`])], false);
  return [el("div", { class: "row-inline" }, color, name)];
}

function categoryPicker(category) {
  const colors = dictionary.colors;
  const pickers = {
    one: () => radios(category, category.options, false),
    at_most_one: () => radios(category, category.options, true),
    color: () => radios(category, colors, true),
    colors: () => checkboxes(category, colors, category.max ?? 2),
    many: () => checkboxes(category, category.options, category.max),
    outfit: () => outfitPicker(category),
  };
  const build = pickers[category.select];
  if (!build) return null;
  const rule = RULES[category.select](category);
  return el("fieldset", { class: `dict-category select-${category.select}`, "data-key": category.key },
    el("legend", {}, `${category.label_ko || ""} ${category.label} `, el("span", { class: "muted", text: rule })),
    ...build());
}

function render() {
  fillSelect($("dict-preset"), [["", "no preset"], ...dictionary.presets.map((p) => [p.id, p.label])], false);
  fillSelect($("dict-character"), [["", "no character"], ...dictionary.characters.map((c) => [c.id, c.name])], false);
  $("dict-character-note").textContent = "";
  $("dict-categories").replaceChildren(...dictionary.categories.map(categoryPicker).filter(Boolean));
  $("dict-error").textContent = "";
}

/** The choices as POST /v1/prompts/build takes them; unset ones are left out. */
export function readChoices() {
  const choices = {};
  if ($("dict-preset").value) choices.preset = $("dict-preset").value;
  if ($("dict-character").value) choices.character = $("dict-character").value;
  for (const category of dictionary.categories) {
    const inputs = [...document.querySelectorAll(`[name="dict-${category.key}"]`)];
    if (category.select === "colors" || category.select === "many") {
      const values = inputs.filter((i) => i.checked).map((i) => i.value);
      if (values.length) choices[category.key] = values;
    } else if (category.select === "outfit") {
      const name = $("dict-outfit-name").value;
      if (name) choices[category.key] = { name, color: $("dict-outfit-color").value || null };
    } else {
      const value = inputs.find((i) => i.checked)?.value;
      if (value) choices[category.key] = value;
    }
  }
  return choices;
}

function blendText() {
  const from = $("blend-from").value.trim();
  const to = $("blend-to").value.trim();
  return `[${from || "young"}:${to || "old"}:${$("blend-when").value}]`;
}

async function build(onBuilt) {
  $("dict-error").textContent = "";
  const seedText = $("dict-seed").value.trim();
  try {
    const built = await api("/v1/prompts/build", {
      method: "POST", body: { choices: readChoices(), seed: seedText === "" ? null : Number(seedText) },
    });
    let prompt = built.prompt;
    if ($("blend-from").value.trim() && $("blend-to").value.trim()) prompt = `${prompt.replace(/[\s,]*$/, "")}, ${blendText()}`;
    $("dict-seed").value = built.seed ?? "";
    onBuilt({ prompt, negative_prompt: built.negative_prompt, settings: built.settings });
  } catch (err) {
    $("dict-error").textContent = err.message;
  }
}

/** Load the dictionary and wire its pickers; `onBuilt({prompt, negative_prompt, settings})` takes a build. */
export async function setupDictionary(onBuilt) {
  try {
    dictionary = await api("/v1/prompt-dictionary");
  } catch (err) {
    if (!(err instanceof ApiError && err.status === 404)) throw err;
    $("dict-missing").hidden = false;
    $("dict-body").hidden = true;
    return;
  }
  render();
  $("dict-character").addEventListener("change", () => {
    const character = dictionary.characters.find((c) => c.id === $("dict-character").value);
    $("dict-character-note").textContent = character
      ? `fidelity ${character.fidelity}${character.note ? ` · ${character.note}` : ""}` : "";
  });
  const preview = () => { $("blend-preview").textContent = blendText(); };
  for (const id of ["blend-from", "blend-to", "blend-when"]) $(id).addEventListener("input", preview);
  $("dict-build").addEventListener("click", () => build(onBuilt));
  $("dict-reset").addEventListener("click", () => { render(); $("dict-seed").value = ""; });
}
