// Parses every Bicep file under a folder with tree-sitter's Bicep grammar and prints each syntax
// error as file:line:column; exits 1 if there is any. No Bicep compiler runs on the CI machine,
// so this is what catches a brace or a comma the text checks of tests/api/infrastructure.rs
// would read past.
//
// A .bicepparam file is `using` and `param name = value` lines, which the grammar of .bicep
// files does not take: its `using` line is skipped and each `param` read as a `var` of the same
// width, so that its values are checked and the positions stay true.
//
//     NODE_PATH=<where web-tree-sitter and tree-sitter-bicep are> node .ci/bicep-syntax.js infra
const fs = require('fs');
const path = require('path');
const Parser = require('web-tree-sitter');

function files(dir) {
  return fs.readdirSync(dir, { withFileTypes: true }).flatMap((entry) => {
    const full = path.join(dir, entry.name);
    return entry.isDirectory() ? files(full) : [full];
  });
}

function asBicep(file, text) {
  if (!file.endsWith('.bicepparam')) return text;
  return text
    .split('\n')
    .map((line) => line.replace(/^(\s*)using\b/, '$1//   ').replace(/^(\s*)param\b/, '$1var  '))
    .join('\n');
}

function errors(node, found) {
  if (node.type === 'ERROR' || node.isMissing) {
    found.push(node);
  } else if (node.hasError) {
    for (const child of node.children) errors(child, found);
  }
  return found;
}

(async () => {
  await Parser.init();
  const parser = new Parser();
  parser.setLanguage(
    await Parser.Language.load(require.resolve('tree-sitter-bicep/tree-sitter-bicep.wasm')),
  );
  const root = process.argv[2];
  const checked = files(root).filter((f) => /\.bicep(param)?$/.test(f)).sort();
  let failures = 0;
  for (const file of checked) {
    const tree = parser.parse(asBicep(file, fs.readFileSync(file, 'utf8')));
    for (const node of errors(tree.rootNode, [])) {
      failures += 1;
      const at = `${file}:${node.startPosition.row + 1}:${node.startPosition.column + 1}`;
      const what = node.isMissing ? `missing ${node.type}` : 'syntax error';
      console.log(`${at}: ${what} near \`${node.text.slice(0, 60).replace(/\s+/g, ' ')}\``);
    }
  }
  if (checked.length === 0) {
    console.log(`no Bicep files under ${root}`);
    process.exit(1);
  }
  console.log(`${checked.length} Bicep files read, ${failures} syntax errors`);
  process.exit(failures ? 1 : 0);
})();
