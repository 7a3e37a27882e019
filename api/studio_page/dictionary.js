// The prompt dictionary (GET /v1/prompt-dictionary) as pickers that cannot express a conflict: one "start from"
// select (a quality preset or a character, never both), radio buttons where a category takes exactly one, radio
// buttons with "none" where it takes at most one, checkboxes that disable themselves at a category's limit (two hair
// colours), colour + outfit selects, and categories locked while the preset draws no people or the character's own
// prompt decides them; the props picker shows the notes' warning. "Build prompt" sends the choices to POST
// /v1/prompts/build, which still checks every rule, and lists the warnings of the build it answers.

import { $, ApiError, api, el, fillSelect } from "./lib.js";

const RULES = {
  one: () => "exactly one",
  at_most_one: () => "at most one",
  colors: (c) => `up to ${c.max ?? 2}; none: random`,
  color: () => "one; none: random",
  many: (c) => (c.max ? `up to ${c.max}` : "any number"),
  outfit: () => "colour + outfit",
};
// Categories whose rule is the notes' advice rather than a limit: shown next to the picker from the dictionary's
// notes (an operator's file may word it differently). POST /v1/prompts/build warns when the advice is not taken.
const ADVICE = {
  props: { note: "props", rule: "several, but not recommended" },
};

let dictionary = null;
let wired = false; // a second sign-in reloads the dictionary, not the listeners

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
    const none = category.select === "color" ? { value: "random", label_ko: "무작위" } : { value: "none", label_ko: "없음" };
    items.unshift(optionLabel(el("input", { type: "radio", name, value: "", checked: chosen === "" }), none));
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
  const advice = ADVICE[category.key] ? dictionary.notes?.[ADVICE[category.key].note] : null;
  const rule = advice ? ADVICE[category.key].rule : RULES[category.select](category);
  return el("fieldset", { class: `dict-category select-${category.select}`, "data-key": category.key },
    el("legend", {}, `${category.label_ko || ""} ${category.label} `, el("span", { class: "muted", text: rule }),
      el("span", { class: "locked" })),
    advice ? el("p", { class: "advice", text: `⚠ ${advice}` }) : null,
    ...build());
}

function render() {
  fillSelect($("dict-base"), [["", "the notes' quality line"],
    ...dictionary.presets.map((p) => [`preset:${p.id}`, `preset: ${p.label}`]),
    ...dictionary.characters.map((c) => [`character:${c.id}`, `character: ${c.name}`])], false);
  $("dict-categories").replaceChildren(...dictionary.categories.map(categoryPicker).filter(Boolean));
  $("dict-error").textContent = "";
  $("dict-warnings").textContent = "";
  lockCategories();
}

function chosenBase() {
  const [kind, id] = $("dict-base").value.split(":");
  return {
    preset: kind === "preset" ? dictionary.presets.find((p) => p.id === id) : null,
    character: kind === "character" ? dictionary.characters.find((c) => c.id === id) : null,
  };
}

// The dictionary's `people` and `sets` say what a preset or character decides. The fallbacks read an operator's
// older dictionary file without them: a preset whose negative prompt excludes people draws none, and a character's
// prompt decides the categories whose option text it contains.
const drawsPeople = (preset) => preset.people ?? !/(^|,)\s*(human|1girl)\s*,/i.test(preset.negative_prompt);
function categoriesSet(character) {
  if (character.sets) return character.sets;
  const parts = character.prompt.split(/[,\n]/).map((part) => part.trim().toLowerCase());
  const has = (text) => parts.includes(text.toLowerCase());
  return dictionary.categories.filter((category) => {
    if (category.select === "colors") return dictionary.colors.some((c) => has(`${c.value} hair`));
    if (category.select === "color") return dictionary.colors.some((c) => has(`${c.value} eyes`));
    return category.options.some((o) => has(o.value));
  }).map((category) => category.key);
}

/** Categories the base decides are disabled (and left out of the choices), saying why. */
function lockCategories() {
  const { preset, character } = chosenBase();
  let locked = [];
  let why = "";
  if (preset && !drawsPeople(preset)) {
    [locked, why] = [dictionary.categories.map((c) => c.key), `${preset.label} draws no people`];
  }
  if (character) [locked, why] = [categoriesSet(character), `set by ${character.name}`];
  for (const fieldset of document.querySelectorAll(".dict-category")) {
    const isLocked = locked.includes(fieldset.dataset.key);
    fieldset.disabled = isLocked;
    fieldset.querySelector(".locked").textContent = isLocked ? ` · ${why}` : "";
  }
  $("dict-base-note").textContent = character
    ? `fidelity ${character.fidelity}${character.note ? ` · ${character.note}` : ""}` : "";
}

/** The choices as POST /v1/prompts/build takes them; unset ones are left out. */
export function readChoices() {
  const choices = {};
  const { preset, character } = chosenBase();
  if (preset) choices.preset = preset.id;
  if (character) choices.character = character.id;
  for (const category of dictionary.categories) {
    if (document.querySelector(`.dict-category[data-key="${category.key}"]`)?.disabled) continue;
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
  const [from, to] = [$("blend-from").value.trim(), $("blend-to").value.trim()];
  if (from || to) choices.blend = { from, to, when: Number($("blend-when").value) };
  return choices;
}

function blendText() {
  const [from, to] = [$("blend-from").value.trim(), $("blend-to").value.trim()];
  return from || to ? `[${from}:${to}:${$("blend-when").value}]` : "";
}

async function build(onBuilt) {
  $("dict-error").textContent = "";
  $("dict-warnings").textContent = "";
  const seedText = $("dict-seed").value.trim();
  try {
    const built = await api("/v1/prompts/build", {
      method: "POST", body: { choices: readChoices(), seed: seedText === "" ? null : Number(seedText) },
    });
    $("dict-seed").value = built.seed ?? "";
    // Built all the same, but against the notes' advice (more than a few props get swallowed).
    $("dict-warnings").replaceChildren(...(built.warnings ?? []).map((text) => el("li", { text })));
    onBuilt(built);
  } catch (err) {
    $("dict-error").textContent = err.message;
  }
}

/** Load the dictionary and wire its pickers; `onBuilt({prompt, negative_prompt, settings, ...})` takes a build. */
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
  if (wired) return;
  wired = true;
  $("dict-base").addEventListener("change", lockCategories);
  // The blend's texts cannot hold what would break the [from:to:when] syntax.
  const preview = (event) => {
    if (event.target.type === "text") event.target.value = event.target.value.replace(/[[\]:\n]/g, "");
    $("blend-preview").textContent = blendText();
  };
  for (const id of ["blend-from", "blend-to", "blend-when"]) $(id).addEventListener("input", preview);
  $("dict-build").addEventListener("click", () => build(onBuilt));
  $("dict-reset").addEventListener("click", () => { render(); $("dict-seed").value = ""; });
}
